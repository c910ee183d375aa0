"""What a running server reports besides its routing.

* :mod:`.metrics` -- live per-layer metrics counted inside the selection kernel (``--xshare-metrics``);
* :mod:`.recorder` -- router-logit traces of decode batches (``--xshare-record-trace``).
"""
