//! The userspace binary embeds the kernel object: fail early, with the
//! command to run, when it has not been built.
fn main() {
    let obj = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bpfel-unknown-none/release/redirect");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        panic!(
            "\n\nThe eBPF object {} is missing.\nRun `cargo xtask build-ebpf` first (it installs rust-src and bpf-linker when needed).\n\n",
            obj.display()
        );
    }
}
