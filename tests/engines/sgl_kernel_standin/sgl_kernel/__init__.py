"""Import stand-in for ``sgl_kernel``, SGLang's compiled kernel package, for running SGLang 0.5.23 on a CPU in tests.

What it is: a plain Python package named ``sgl_kernel`` that defines the names SGLang 0.5.23 imports from
``sgl_kernel`` at module level on its CPU path (``SGLANG_USE_CPU_ENGINE=1``). It holds no kernels: every
function raises ``NotImplementedError`` naming itself if it is ever called. It is put on the engine's
PYTHONPATH only (tests/engines/sglang_engine.py), never installed, and never used by the project's code.

Why: the package registry has only CUDA builds of SGLang's kernel package (``sglang-kernel``, ``sgl-kernel``),
which fail to load without libcuda; SGLang's CPU kernel package is built from SGLang's source tree, which the
registry does not hold. Without some ``sgl_kernel`` the server cannot even import on a CPU.

The names: SGLang 0.5.23 imports them at module level under ``if _is_cpu:`` in
``kernels/ops/kvcache/cache_move.py`` (``copy_all_layer_kv_cache_cpu``: KV slot moves, set up only when
a pool is built with KV-copy support, for speculative decoding), ``srt/mem_cache/allocation.py``
(``assign_req_to_token_pool_cpu``: called only by the speculative-decoding allocator),
``kernels/ops/speculative/{cache_locs,spec_tree,eagle,multi_layer_eagle}.py`` (speculative decoding);
``build_draft_decode_metadata_cpu`` is imported inside the AMX attention backend's speculative path.
Serving ``models/arith-teacher`` with prefill + decode, logprobs and hidden states takes none of these
paths: with real SGLang 0.5.23 on a CPU, scoring with ``return_hidden_states``, batched and repeated
(radix cache hits) ``/generate`` calls and sampled and greedy decoding never called one. A call would
fail the request and leave the ``NotImplementedError`` in the server's log.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = [
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_draft_decode_metadata_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
]

__version__ = "0.0.0+standin"


def _not_here(name: str) -> NoReturn:
    raise NotImplementedError(
        f"sgl_kernel.{name} was called, but this sgl_kernel is the test suite's import stand-in "
        "(tests/engines/sgl_kernel_standin), which has no kernels"
    )


def copy_all_layer_kv_cache_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("copy_all_layer_kv_cache_cpu")


def assign_req_to_token_pool_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("assign_req_to_token_pool_cpu")


def assign_extend_cache_locs_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("assign_extend_cache_locs_cpu")


def assign_draft_cache_locs_contiguous_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("assign_draft_cache_locs_contiguous_cpu")


def build_tree_kernel_efficient_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("build_tree_kernel_efficient_cpu")


def verify_tree_greedy_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("verify_tree_greedy_cpu")


def fill_accept_out_cache_loc_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("fill_accept_out_cache_loc_cpu")


def fill_bonus_tokens_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("fill_bonus_tokens_cpu")


def rotate_input_ids_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("rotate_input_ids_cpu")


def build_draft_decode_metadata_cpu(*args: Any, **kwargs: Any) -> NoReturn:
    _not_here("build_draft_decode_metadata_cpu")
