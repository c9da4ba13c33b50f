//! `qoe-router`: see `qoe-router --help`.

fn main() {
    if let Err(e) = qoe_router::cli::main_with_args(std::env::args_os()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
