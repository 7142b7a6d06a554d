//! Where the files the config names are read from. A relative path is read relative to the
//! working directory of the process, not to the config file that names it (as with most servers,
//! and as a container's absolute mount paths make moot); errors about such a file say which
//! directory that was, so `cd ~ && greeter config check -c ~/src/greeter/secure.toml` failing on
//! `certs/server.pem` explains itself.

use std::path::Path;

/// `""` for an absolute path; for a relative one, the directory it was read from, as a note to
/// append to an error about it.
pub fn relative_note(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    if path.is_absolute() {
        return String::new();
    }
    match std::env::current_dir() {
        Ok(dir) => format!(
            " (a relative path, read from the working directory {}: give an absolute path, or \
             run from the directory it is relative to)",
            dir.display()
        ),
        Err(_) => " (a relative path, read from the working directory)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_name_the_directory_they_were_read_from() {
        assert_eq!(relative_note("/etc/greeter/tls/tls.crt"), "");
        let note = relative_note("certs/server.pem");
        let cwd = std::env::current_dir().unwrap();
        assert!(note.contains(&cwd.display().to_string()), "{note}");
    }
}
