"""The in-server A/B measurement (``--xshare-ab-switch``, ``--xshare-ab-arm``, ``--xshare-ab-idle-arms``).

* :mod:`.switch` -- the switch file and its device flag (:class:`~.switch.ABSwitch`);
* :mod:`.arms` -- the arm mini-language (``policy=oea,warmup-k0=4``) and the arms' configs;
* :mod:`.ab` -- the routing under the switch (:class:`~.ab.Measurement`).

Imported only when the measurement is configured: a server without ``--xshare-ab-switch`` runs
the production path alone and never loads these modules.
"""
