//! NoCloud seed ISO writer (volume id `cidata`): user-data, meta-data, network-config and the
//! agent's `imagectl/agent.json`.
