use clap::Parser;

/// glibc's malloc spent about 15 % of a busy server's CPU (arena locks and consolidation across
/// the runtime's and the stores' threads); mimalloc's per-thread heaps avoid that.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc 3's option enum (`mimalloc.h`).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commits arena memory as it is used rather than up front: with eager commit an idle node's
/// resident memory tripled (a datastore node 21 -> 69 MB, an agent-only node 18 -> 28 MB). The
/// option only affects arenas made after it is set, so it is set before `main`, ahead of the
/// first Rust allocation.
extern "C" fn lazy_arena_commit() {
    // SAFETY: setting an option is a plain store into mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[link_section = ".init_array"]
static LAZY_ARENA_COMMIT: extern "C" fn() = lazy_arena_commit;

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
