//! The process-wide side of remote inputs: the TLS and auth options a command was given, one
//! agent for every URL it opens, and the sources opened so far (for the transfer figures).

use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, Context};
use ureq::Agent;

use super::{is_url, shown, HttpSource, Secret, Transfer};
use crate::cmd::upload::auth::{self, AuthOptions};
use crate::cmd::upload::http::{self, Http, Tls};

/// How remote inputs are reached.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `--insecure`, `OS_CACERT`.
    pub tls: Tls,
    /// Log requests (never headers) to stderr.
    pub verbose: bool,
    /// Credentials for `glance://IMAGE_ID` (else taken from the `OS_*` variables).
    pub auth: Option<AuthOptions>,
    /// The largest object read (`--max-remote-size`).
    pub max_size: u64,
}

static CONFIG: OnceLock<Config> = OnceLock::new();
static AGENT: OnceLock<Agent> = OnceLock::new();
static OPENED: Mutex<Vec<(String, HttpSource)>> = Mutex::new(Vec::new());

/// The largest object this command reads from a URL.
pub fn max_size() -> u64 {
    config().max_size
}

/// Sets the options for this command; the first call wins (one command per process).
pub fn configure(config: Config) {
    let _ = CONFIG.set(config);
}

fn config() -> &'static Config {
    CONFIG.get_or_init(|| Config {
        tls: Tls {
            insecure: false,
            cacert: env("OS_CACERT").map(Into::into),
        },
        verbose: false,
        auth: None,
        max_size: super::MAX_SIZE,
    })
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn agent() -> anyhow::Result<Agent> {
    if let Some(a) = AGENT.get() {
        return Ok(a.clone());
    }
    let a = http::agent(&config().tls)?;
    Ok(AGENT.get_or_init(|| a).clone())
}

/// The `glance://` prefix of an image in the Glance of the auth options.
pub const GLANCE: &str = "glance://";

/// True for an input that names a remote object: an `http(s)://` URL or `glance://IMAGE_ID`.
pub fn is_remote(s: &str) -> bool {
    is_url(s) || s.starts_with(GLANCE)
}

/// The auth options from the `OS_*` variables, as `upload` reads them without flags.
fn env_auth() -> AuthOptions {
    AuthOptions {
        token: env("OS_AUTH_TOKEN").map(Secret::new),
        image_url: env("OS_IMAGE_URL"),
        cloud: env("OS_CLOUD"),
        auth_url: env("OS_AUTH_URL"),
        username: env("OS_USERNAME"),
        user_id: env("OS_USER_ID"),
        password: env("OS_PASSWORD").map(Secret::new),
        project_name: env("OS_PROJECT_NAME").or_else(|| env("OS_TENANT_NAME")),
        project_id: env("OS_PROJECT_ID").or_else(|| env("OS_TENANT_ID")),
        user_domain_name: env("OS_USER_DOMAIN_NAME"),
        user_domain_id: env("OS_USER_DOMAIN_ID"),
        project_domain_name: env("OS_PROJECT_DOMAIN_NAME"),
        project_domain_id: env("OS_PROJECT_DOMAIN_ID"),
        region: env("OS_REGION_NAME"),
        interface: env("OS_INTERFACE"),
        tls: config().tls.clone(),
    }
}

/// Opens `input` (an `http(s)://` URL or `glance://IMAGE_ID`) and remembers it under its
/// shown name for [`transfer_of`].
///
/// # Errors
/// As [`HttpSource::open`]; for Glance, authentication failures.
pub fn open(input: &str) -> anyhow::Result<HttpSource> {
    let agent = agent()?;
    let src = if let Some(id) = input.strip_prefix(GLANCE) {
        let id = id.trim_end_matches('/');
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            anyhow::bail!("{input}: not an image id (glance://IMAGE_ID)");
        }
        let mut opts = config().auth.clone().unwrap_or_else(env_auth);
        auth::apply_cloud(&mut opts)?;
        let client = Http::new(agent.clone(), &config().tls, config().verbose);
        let session = auth::authenticate(&client, &opts).context("glance:// needs credentials")?;
        let url = format!("{}/v2/images/{id}/file", session.image_url);
        HttpSource::open(agent, &url, vec![("X-Auth-Token".into(), session.token)])
            .map_err(|e| anyhow!("{input}: {e:#}"))?
    } else {
        HttpSource::open(agent, input, Vec::new())?
    };
    if config().verbose {
        errln!(
            "glimpse: {}: {} bytes, range requests {}",
            src.shown(),
            src.size_hint().map_or("unknown".into(), |s| s.to_string()),
            if src.ranges_supported() {
                "supported"
            } else {
                "not supported"
            }
        );
    }
    if let Ok(mut o) = OPENED.lock() {
        o.push((display(input), src.clone()));
    }
    Ok(src)
}

/// How an input is named in output: a URL without credentials, `glance://ID` as given.
pub fn display(input: &str) -> String {
    if is_url(input) {
        shown(input)
    } else {
        input.to_string()
    }
}

/// The transfer of every source opened under `name`, when any was.
fn transfer_of(name: &str) -> Option<Transfer> {
    let o = OPENED.lock().ok()?;
    let mut found = false;
    let mut t = Transfer::default();
    for (n, s) in o.iter().filter(|(n, _)| n == name) {
        let _ = n;
        found = true;
        let x = s.transfer();
        t.requests += x.requests;
        t.bytes += x.bytes;
    }
    found.then_some(t)
}

/// Prints each remote source's transfer to stderr (with `-v`).
pub fn log_transfers() {
    if !config().verbose {
        return;
    }
    if let Ok(o) = OPENED.lock() {
        for (n, s) in o.iter() {
            let t = s.transfer();
            errln!(
                "glimpse: {n}: transfer: {} requests, {} bytes",
                t.requests,
                t.bytes
            );
        }
    }
}

/// Options for URL inputs, on every command that reads an image.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Opts {
    /// For https:// inputs: do not verify TLS certificates.
    #[arg(long)]
    pub insecure: bool,
    /// For https:// inputs: a PEM bundle of CA certificates to trust instead of the built-in
    /// roots.
    #[arg(long, env = "OS_CACERT", value_name = "FILE")]
    pub os_cacert: Option<std::path::PathBuf>,
    /// For URL inputs: print each one's size, range support and transfer (requests, bytes)
    /// to stderr; never credentials.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// For URL inputs: the largest object to read (k, M, G, T suffixes); a server that says
    /// its object is larger is refused before anything else is read. The default is Glance's
    /// default `image_size_cap`.
    #[arg(long, value_name = "SIZE", default_value = "1T", value_parser = crate::common::parse_size)]
    pub max_remote_size: u64,
}

impl Opts {
    /// Makes these the options of every URL this command opens.
    pub fn apply(&self) {
        configure(Config {
            tls: Tls {
                insecure: self.insecure,
                cacert: self.os_cacert.clone(),
            },
            verbose: self.verbose,
            auth: None,
            max_size: self.max_remote_size,
        });
    }
}

/// Adds `"transfer": {requests, bytes}` to each JSON object whose `filename` was opened
/// remotely (an array is walked one level).
pub fn annotate(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Array(items) => items.iter_mut().for_each(annotate_one),
        other => annotate_one(other),
    }
}

fn annotate_one(v: &mut serde_json::Value) {
    // error.json objects stay as documented: {filename, error}
    let Some(m) = v.as_object_mut().filter(|m| !m.contains_key("error")) else {
        return;
    };
    let Some(t) = m
        .get("filename")
        .and_then(|f| f.as_str())
        .and_then(transfer_of)
    else {
        return;
    };
    m.insert("transfer".into(), t.json());
}
