//! `imagectl-agent` binary entry point.

fn main() {
    eprintln!("imagectl-agent: not configured");
    std::process::exit(1);
}
