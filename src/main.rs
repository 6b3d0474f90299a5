use clap::Parser;

fn main() {
    let cli = eden::cli::Cli::parse();
    match eden::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("eden: {e}");
            std::process::exit(2);
        }
    }
}
