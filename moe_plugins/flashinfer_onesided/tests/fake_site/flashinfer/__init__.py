"""A CPU fake of the parts of FlashInfer 0.7.2.post1 that moe_plugin_flashinfer_onesided uses.

Put ``tests/fake_site`` first on ``sys.path`` and ``import flashinfer`` finds
this package (and ``importlib.metadata`` the matching dist-info), so the
plugin's adapter runs unchanged against it. It emulates, on CPU tensors and
over any torch.distributed group (gloo in the tests):

* ``flashinfer.comm.MoeAlltoAll``: the workspace layout (aux region, payload
  planes packed back to back, combine region), the kernel's checks (payload
  alignment, workspace size, ``R > 0``, top_k <= 22, at most 6 payloads, phase
  asserts), the contiguous partition ``id // (E / ep)``, each token sent once
  per target rank into a slot chosen in *random* order (the real kernel uses
  atomics), padding rows left stale (the workspace starts as random bytes and
  is never cleared), the sanitize step writing ``invalid_token_expert_id`` into
  the padding rows, the per-source receive counters, and combine as the
  unweighted fp32 sum over target ranks;
* ``flashinfer.moe_ep.NVLinkOneSidedAlltoAll`` over the fake ``MoeAlltoAll``,
  with its parameter checks (``invalid_expert_id`` outside ``[0, E)``);
* the JIT spec of the all-to-all module (``flashinfer.jit.comm``), whose build
  writes a file and can be slowed down with ``FAKE_FLASHINFER_BUILD_S``.

Signatures follow 0.7.2.post1; ``test_fi_fake_fidelity.py`` compares them with
an installed FlashInfer when one is available.
"""

__version__ = "0.7.2.post1"
FAKE = True
