"""SGLang's plugin entry point (``sglang.srt.plugins``: ``xshare = sglang_xshare.serving.hook:sglang_plugin``).

The plugin itself is :mod:`.install`; this module only gives the entry point its stable name.
"""

from .install import sglang_plugin

__all__ = ["sglang_plugin"]
