//! The `imagectl` binary: parses the command line and hands over to [`imagectl::cli`].

fn main() {
    std::process::exit(imagectl::cli::main());
}
