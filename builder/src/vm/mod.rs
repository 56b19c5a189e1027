//! Local virtual machines: QEMU processes and the guest agent protocol.
