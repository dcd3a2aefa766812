"""dtake playbooks (Fabric 3): deploy, cluster, resources, verify, upgrade; see docs/playbooks.md.

Layers (as pcs): ``cli`` (argv, rendering) -> one module per action (``deploy``,
``cluster``, ``resources``, ``verify``, ``upgrade``) returning a
:class:`~playbooks.recap.PlaybookResult` -> domain modules (``spec``, ``cib``,
``corosync``, ``pacemaker``, ``recap``) and the host seam (``remote``; doubles in
``testing``).
"""

__all__: list[str] = []
