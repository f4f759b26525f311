// Rebuild when bpf-linker changes (it is what links the BPF object).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
