//! Loading: the layers, merged in order, and the provenance of every value, so that an error names
//! the file, variable or flag that set it.

use std::path::{Path, PathBuf};

use config::{Environment, File, FileFormat};

use super::{Config, DEFAULT_TOML, values};

const ENV_PREFIX: &str = "GREETER";
const ENV_SEPARATOR: &str = "__";
const EMBEDDED_ORIGIN: &str = "the embedded default config";
pub(super) const OVERRIDE_ORIGIN: &str = "the command line";

/// A configuration that could not be loaded: which layer, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The file path, environment variable or "the command line" that set the offending value.
    pub origin: String,
    /// The dotted key, when the error is about one key.
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub(super) fn new(
        origin: impl Into<String>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            origin: origin.into(),
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// Where the layers come from. Tests pass their own environment instead of mutating the process's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config` files, in order; later files win.
    pub files: Vec<PathBuf>,
    /// `(name, value)` pairs to read `GREETER__*` variables from.
    pub env: Vec<(String, String)>,
    /// `(dotted key, value)` pairs from command-line flags.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// Files and flags as given, environment from this process.
    pub fn from_process(files: Vec<PathBuf>, overrides: Vec<(String, String)>) -> Self {
        Self {
            files,
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

impl Config {
    /// Merges every layer, then validates the result.
    ///
    /// Each layer is first checked on its own on top of the embedded default, so that an unknown
    /// key or a value of the wrong type is reported against the file or variable that holds it
    /// rather than against the merged whole.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        Self::load_serving(sources, &[])
    }

    /// [`Config::load`] for a server that serves services of its own beside the built-in ones
    /// (`server::OwnService`): `added` are their descriptor sets, so that per-method tables may
    /// name their methods and a mistyped pattern is still caught.
    pub fn load_serving(sources: &Sources, added: &[&'static [u8]]) -> Result<Self, ConfigError> {
        for file in &sources.files {
            if !file.is_file() {
                return Err(ConfigError::new(
                    file.display().to_string(),
                    None,
                    "config file not found (or not a regular file)",
                ));
            }
            let layer = embedded_builder().add_source(file_source(file));
            let shown = file.display().to_string();
            // Name the file as the operator wrote it: the config crate reports paths relative to
            // the working directory, which reads like a different file.
            build(layer, &shown).map_err(|error| ConfigError {
                origin: shown,
                ..error
            })?;
        }
        build(add_env(embedded_builder(), &sources.env), "the environment")?;
        let mut overrides = embedded_builder();
        for (key, value) in &sources.overrides {
            overrides = overrides
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| convert(e, OVERRIDE_ORIGIN))?;
        }
        build(overrides, OVERRIDE_ORIGIN)?;

        let mut merged = embedded_builder();
        for file in &sources.files {
            merged = merged.add_source(file_source(file));
        }
        merged = add_env(merged, &sources.env);
        for (key, value) in &sources.overrides {
            merged = merged
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| convert(e, OVERRIDE_ORIGIN))?;
        }
        let config = build(merged, "the merged config")?;
        config.validate(&Origins(sources), added)?;
        Ok(config)
    }
}

impl Config {
    /// The merged config as TOML, each value that is not the embedded default's followed by a
    /// comment naming the layer that set it: `config show` answers "where does this come from?"
    /// without a diff of four layers.
    pub fn to_toml_with_origins(&self, sources: &Sources) -> String {
        let origins = Origins(sources);
        let mut table = String::new();
        let mut out = String::new();
        for line in self.to_toml().lines() {
            let trimmed = line.trim_start();
            if let Some(header) = trimmed.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                table = header.trim_matches(['[', ']']).to_owned();
            }
            out.push_str(line);
            // An array of tables ([[auth.jwt.issuers]]) is set whole by one layer: name it there.
            let array_of_tables = trimmed.starts_with("[[");
            let setting = (!line.starts_with(' ') && !trimmed.starts_with('['))
                .then(|| trimmed.split_once(" = "))
                .flatten();
            let dotted = match setting {
                _ if array_of_tables => Some(table.clone()),
                None => None,
                Some((key, _)) if table.is_empty() => Some(key.to_owned()),
                // A quoted key (a method pattern) holds dots of its own: name its table instead.
                Some((key, _)) if key.starts_with('"') => Some(table.clone()),
                Some((key, _)) => Some(format!("{table}.{key}")),
            };
            if let Some(origin) = dotted
                .map(|key| origins.origin_of(&key))
                .filter(|origin| origin != EMBEDDED_ORIGIN)
            {
                out.push_str("  # ");
                out.push_str(&origin);
            }
            out.push('\n');
        }
        out
    }
}

/// Answers "which layer set this key?" for errors found after merging, by asking the layers in
/// reverse order of precedence (the config crate's merged values do not keep their origin).
pub(super) struct Origins<'a>(&'a Sources);

impl Origins<'_> {
    pub(super) fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError::new(self.origin_of(key), Some(key), message)
    }

    /// Whether a `--config` file set `key`, and neither the environment nor the command line
    /// overrode it.
    pub(super) fn set_by_file(&self, key: &str) -> bool {
        let var = env_var_name(key);
        !self.0.overrides.iter().any(|(k, _)| k == key)
            && !self.0.env.iter().any(|(name, _)| *name == var)
            && self.0.files.iter().any(|file| file_sets(file, key))
    }

    fn origin_of(&self, key: &str) -> String {
        if self.0.overrides.iter().any(|(k, _)| k == key) {
            return OVERRIDE_ORIGIN.to_owned();
        }
        let var = env_var_name(key);
        if self.0.env.iter().any(|(name, _)| *name == var) {
            return format!("environment variable {var}");
        }
        self.0
            .files
            .iter()
            .rev()
            .find(|file| file_sets(file, key))
            .map_or_else(
                || EMBEDDED_ORIGIN.to_owned(),
                |file| file.display().to_string(),
            )
    }
}

/// Whether the TOML file at `path` sets the dotted `key` (it parsed once already, in `load`).
fn file_sets(path: &Path, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let mut parts = key.split('.');
    let mut value = parts.next().and_then(|first| table.get(first));
    for part in parts {
        value = value.and_then(|v| v.get(part));
    }
    value.is_some()
}

/// The config crate names layers by URI ("config/x.toml", "the environment"); we name the exact
/// variable for environment values so the operator can `unset` it.
fn describe_origin(origin: &str, key: &str) -> String {
    if origin == "the environment" || origin.eq_ignore_ascii_case("environment") {
        format!("environment variable {}", env_var_name(key))
    } else {
        origin.to_owned()
    }
}

/// `server.listen` -> `GREETER__SERVER__LISTEN`.
pub fn env_var_name(key: &str) -> String {
    let path = key.to_uppercase().replace('.', ENV_SEPARATOR);
    format!("{ENV_PREFIX}{ENV_SEPARATOR}{path}")
}

type Builder = config::ConfigBuilder<config::builder::DefaultState>;

fn embedded_builder() -> Builder {
    config::Config::builder().add_source(
        File::from_str(DEFAULT_TOML, FileFormat::Toml), // origin: None, named EMBEDDED_ORIGIN
    )
}

fn file_source(path: &Path) -> File<config::FileSourceFile, FileFormat> {
    File::from(path).format(FileFormat::Toml).required(true)
}

/// Environment variables hold text; numbers and booleans are recognised by parsing. A key whose
/// value is text that looks like a number (a file mode's "0660") is read as text, as written.
const ENV_TEXT_KEYS: [&str; 1] = ["GREETER__SERVER__UNIX_MODE"];

fn add_env(builder: Builder, vars: &[(String, String)]) -> Builder {
    let (text, parsed): (Vec<_>, Vec<_>) = vars
        .iter()
        .cloned()
        .partition(|(name, _)| ENV_TEXT_KEYS.contains(&name.as_str()));
    builder
        .add_source(
            env_source()
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("greeter.stream_greetings")
                .with_list_parse_key("compression.accept")
                .with_list_parse_key("compression.send")
                .with_list_parse_key("auth.client_cert_scopes")
                .with_list_parse_key("web.allowed_origins")
                .source(Some(parsed.into_iter().collect())),
        )
        .add_source(env_source().source(Some(text.into_iter().collect())))
}

fn env_source() -> Environment {
    Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
}

/// Builds and deserializes one layer on top of the embedded default; errors name `origin`.
fn build(builder: Builder, origin: &str) -> Result<Config, ConfigError> {
    builder
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| convert(e, origin))
}

/// Turns the config crate's error into ours, keeping the most precise origin and key it knows.
fn convert(error: config::ConfigError, fallback_origin: &str) -> ConfigError {
    let (origin, key, message) = unpack(error);
    let origin = origin.unwrap_or_else(|| fallback_origin.to_owned());
    let key = key.filter(|k| !k.is_empty());
    ConfigError {
        origin: describe_origin(&origin, key.as_deref().unwrap_or_default()),
        key,
        message,
    }
}

/// `(origin, dotted key, message)` of a config crate error.
fn unpack(error: config::ConfigError) -> (Option<String>, Option<String>, String) {
    use config::ConfigError as E;
    match error {
        E::FileParse { uri, cause } => (
            Some(uri.unwrap_or_else(|| EMBEDDED_ORIGIN.to_owned())),
            None,
            format!("not valid TOML: {}", cause.to_string().trim_end()),
        ),
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            origin,
            key,
            format!("expected {expected}, found {unexpected}"),
        ),
        E::At { error, origin, key } => {
            let (inner_origin, inner_key, message) = unpack(*error);
            let key = match (key, inner_key) {
                (Some(parent), Some(child)) if message.starts_with("unknown field") => {
                    Some(format!("{parent}.{child}"))
                }
                (key, inner_key) => key.or(inner_key),
            };
            (origin.or(inner_origin), key, message)
        }
        E::Message(message) if message == "invalid socket address syntax" => (
            None,
            None,
            "not an IP address and port: give e.g. 127.0.0.1:50051 or [::1]:50051 (host names \
             such as localhost are not looked up: a listener binds an address)"
                .to_owned(),
        ),
        E::Message(message) if message.starts_with("enum ") => {
            let message = values::variants::explain(&message).unwrap_or(message);
            (None, None, message)
        }
        E::Message(message) => {
            // serde reports an unknown key as a message about its parent; name the key itself.
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field.to_owned());
            (None, unknown, message)
        }
        E::NotFound(key) => (None, Some(key), "missing".to_owned()),
        other => (None, None, other.to_string()),
    }
}
