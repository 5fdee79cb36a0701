"""CMDB depth beyond the device CIs (issue 15): sensors as ``cmdb_ci_nids`` CIs related to the devices they
see, and device connections as ``cmdb_rel_ci`` relations, both written through the IRE's relations.

* :mod:`.models` -- normalised sensors and connections, parsed from every source's raw shape (pure);
* :mod:`.state` -- their change-detection state, in the device sync's asset state store (reuses ``SourceState``);
* :mod:`.ire` -- relations between CIs identified by ``sys_object_source``, batched; relation removal;
* :mod:`.sensors` / :mod:`.relations` -- the two engines (a source, the ServiceNow hook, the state store).
"""
