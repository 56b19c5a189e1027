//! imagectl-agent: first-boot registration of the VM's GitLab runner.
//!
//! Placeholder until the agent lands; see issue "Agent: first-boot runner registration".
