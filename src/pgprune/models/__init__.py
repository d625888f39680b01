"""Model families, loading, and the pruned-model code that travels with exports.

Importing this package registers every family's adapter: Python runs this file before any module
inside it, so `adapter.get_adapter` always sees the full registry without importing the families
itself (which would make adapter and the families import each other). A new family module is
added to the imports below.
"""

from pgprune.models import llama  # noqa: F401  (registers llama, mistral, qwen2, qwen3)
