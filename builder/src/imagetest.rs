//! `imagectl test`: boot an image in QEMU and check its services.
