//! Where VMs run: one trait, implemented by the Proxmox and local providers.
