//! `docs/flags.md` carries the flag table generated from the one table in
//! the code (`config::table::TABLE`). This test fails when they differ;
//! `REDIRECT_BLESS=1 cargo test -p redirect-userspace --test flag_docs`
//! rewrites the doc's table from the code.
use std::path::PathBuf;

const START: &str = "<!-- flag-table:start (generated from config::table::TABLE; REDIRECT_BLESS=1 cargo test -p redirect-userspace --test flag_docs) -->\n";
const END: &str = "<!-- flag-table:end -->";

#[test]
fn docs_flag_table_is_the_code_table() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/flags.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (Some(a), Some(b)) = (doc.find(START), doc.find(END)) else {
        panic!(
            "{} lacks the flag-table markers:\n{START}{END}",
            path.display()
        );
    };
    let have = &doc[a + START.len()..b];
    let want = redirect_userspace::config::table::markdown();
    if have != want {
        if std::env::var_os("REDIRECT_BLESS").is_some() {
            let new = format!("{}{START}{want}{}", &doc[..a], &doc[b..]);
            std::fs::write(&path, new).unwrap();
            return;
        }
        panic!(
            "{} has a stale flag table; the code's is:\n{want}\n(REDIRECT_BLESS=1 rewrites it)",
            path.display()
        );
    }
}
