//! `enroll-gateway`: parse the command line, run the command, print the error chain, exit with
//! the code of design.md §2.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(enroll_gateway::cli::main(std::env::args_os()));
}
