//! Stand-alone sandbox init, for tests and for hosts that prefer a separate
//! executable: `NativeOptions { init_exe: <this binary>, init_args: [] }`.

fn main() {
    stacyvm_native::sandbox_init_main()
}
