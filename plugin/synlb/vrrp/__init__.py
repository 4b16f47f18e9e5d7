"""keepalived (VRRP) events, from whatever carries them to the data plane.

- ``events``: pure parsing (notify arguments, notify_fifo lines, D-Bus
  codes -> one ``VrrpEvent``), ``[vrrp]``'s schema and ``VrrpConfig``, the
  node state an event means;
- ``journal``: stamps (the order of events), the record of the newest event
  and the log, in the state dir (files only);
- ``delivery``: ``deliver(event)``, the one entry point: record the newest
  event and reconcile the data plane to it under the lock, or hand it to the
  running host;
- one module per event source on top of it: ``notify`` (``synlb notify``,
  keepalived's notify hook), ``fifo`` (``synlb fifo``, notify_fifo) and
  ``dbus`` (``synlb dbus``, keepalived's D-Bus signals; the host's ``dbus``
  plugin uses its listener).

This file imports nothing: ``config`` imports ``events`` and must not load
the rest of the package with it.
"""
