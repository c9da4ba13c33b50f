//! `qoe-router`: see `qoe-router --help`.

#[tokio::main]
async fn main() {
    if let Err(e) = qoe_router::cli::run(std::env::args_os()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
