//! Credentials the way the OpenStack clients take them: a token plus an image endpoint,
//! Keystone v3 password authentication (token from `X-Subject-Token`, endpoint from the
//! catalog), or a named cloud in `clouds.yaml`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use ureq::http::Method;
use yaml_rust2::{Yaml, YamlLoader};

use super::http::{Body, Http, Secret, Tls};

/// Every `--os-*` option and `OS_*` variable, as given (flags override variables).
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    /// `OS_AUTH_TOKEN`.
    pub token: Option<Secret>,
    /// `OS_IMAGE_URL`: overrides the catalog.
    pub image_url: Option<String>,
    /// `OS_CLOUD`.
    pub cloud: Option<String>,
    /// `OS_AUTH_URL`.
    pub auth_url: Option<String>,
    /// `OS_USERNAME`.
    pub username: Option<String>,
    /// `OS_USER_ID`.
    pub user_id: Option<String>,
    /// `OS_PASSWORD`.
    pub password: Option<Secret>,
    /// `OS_PROJECT_NAME` (or the older `OS_TENANT_NAME`).
    pub project_name: Option<String>,
    /// `OS_PROJECT_ID` (or `OS_TENANT_ID`).
    pub project_id: Option<String>,
    /// `OS_USER_DOMAIN_NAME`.
    pub user_domain_name: Option<String>,
    /// `OS_USER_DOMAIN_ID`.
    pub user_domain_id: Option<String>,
    /// `OS_PROJECT_DOMAIN_NAME`.
    pub project_domain_name: Option<String>,
    /// `OS_PROJECT_DOMAIN_ID`.
    pub project_domain_id: Option<String>,
    /// `OS_REGION_NAME`.
    pub region: Option<String>,
    /// `OS_INTERFACE` (public by default).
    pub interface: Option<String>,
    /// TLS options (`--insecure`, `OS_CACERT`), possibly extended by clouds.yaml.
    pub tls: Tls,
}

/// The authentication options of every command that talks to Glance (`upload`, `audit`), as
/// the OpenStack clients take them: flags, or the `OS_*` variables.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AuthArgs {
    /// A Keystone token (with --os-image-url); never printed. Prefer the variable: a flag's
    /// value is visible to other local users in the process list.
    #[arg(long, env = "OS_AUTH_TOKEN", hide_env_values = true)]
    os_auth_token: Option<String>,
    /// The image service endpoint, e.g. http://glance:9292 (overrides the catalog).
    #[arg(long, env = "OS_IMAGE_URL")]
    os_image_url: Option<String>,
    /// A cloud in clouds.yaml.
    #[arg(long, env = "OS_CLOUD")]
    os_cloud: Option<String>,
    /// Keystone v3 URL.
    #[arg(long, env = "OS_AUTH_URL")]
    os_auth_url: Option<String>,
    /// User name.
    #[arg(long, env = "OS_USERNAME")]
    os_username: Option<String>,
    /// User id.
    #[arg(long, env = "OS_USER_ID")]
    os_user_id: Option<String>,
    /// Password; never printed. Prefer the variable or clouds.yaml: a flag's value is
    /// visible to other local users in the process list.
    #[arg(long, env = "OS_PASSWORD", hide_env_values = true)]
    os_password: Option<String>,
    /// Project name.
    #[arg(long, env = "OS_PROJECT_NAME")]
    os_project_name: Option<String>,
    /// Project id.
    #[arg(long, env = "OS_PROJECT_ID")]
    os_project_id: Option<String>,
    /// The user's domain name.
    #[arg(long, env = "OS_USER_DOMAIN_NAME")]
    os_user_domain_name: Option<String>,
    /// The user's domain id.
    #[arg(long, env = "OS_USER_DOMAIN_ID")]
    os_user_domain_id: Option<String>,
    /// The project's domain name.
    #[arg(long, env = "OS_PROJECT_DOMAIN_NAME")]
    os_project_domain_name: Option<String>,
    /// The project's domain id.
    #[arg(long, env = "OS_PROJECT_DOMAIN_ID")]
    os_project_domain_id: Option<String>,
    /// Region of the image endpoint in the catalog.
    #[arg(long, env = "OS_REGION_NAME")]
    os_region_name: Option<String>,
    /// Catalog interface: public (default), internal or admin.
    #[arg(long, env = "OS_INTERFACE")]
    os_interface: Option<String>,
    /// A PEM bundle of CA certificates to trust instead of the built-in roots.
    #[arg(long, env = "OS_CACERT")]
    os_cacert: Option<PathBuf>,
    /// Do not verify TLS certificates.
    #[arg(long)]
    insecure: bool,
}

impl AuthArgs {
    /// The options as given (clouds.yaml not read yet: see [`apply_cloud`]).
    pub fn options(&self) -> AuthOptions {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        AuthOptions {
            token: self
                .os_auth_token
                .clone()
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            image_url: self.os_image_url.clone(),
            cloud: self.os_cloud.clone(),
            auth_url: self.os_auth_url.clone(),
            username: self.os_username.clone(),
            user_id: self.os_user_id.clone(),
            password: self.os_password.clone().map(Secret::new),
            project_name: self
                .os_project_name
                .clone()
                .or_else(|| env("OS_TENANT_NAME")),
            project_id: self.os_project_id.clone().or_else(|| env("OS_TENANT_ID")),
            user_domain_name: self.os_user_domain_name.clone(),
            user_domain_id: self.os_user_domain_id.clone(),
            project_domain_name: self.os_project_domain_name.clone(),
            project_domain_id: self.os_project_domain_id.clone(),
            region: self.os_region_name.clone(),
            interface: self.os_interface.clone(),
            tls: Tls {
                insecure: self.insecure,
                cacert: self.os_cacert.clone(),
            },
        }
    }
}

/// What a request to Glance needs.
#[derive(Debug)]
pub struct Session {
    /// `X-Auth-Token`.
    pub token: Secret,
    /// The image service's root, without a trailing `/` or `/v2`.
    pub image_url: String,
}

/// Fills in unset options from the cloud named by `OS_CLOUD`, read from the first
/// clouds.yaml found (`OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`,
/// `$XDG_CONFIG_HOME/openstack/` or `~/.config/openstack/`, `/etc/openstack/`).
///
/// # Errors
/// No clouds.yaml, no such cloud, or a file that is not YAML.
pub fn apply_cloud(opts: &mut AuthOptions) -> anyhow::Result<()> {
    let Some(cloud) = opts.cloud.clone() else {
        return Ok(());
    };
    let candidates = clouds_yaml_paths();
    let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        anyhow!(
            "OS_CLOUD={cloud}: no clouds.yaml found (looked at {})",
            list.join(", ")
        )
    })?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let entry = cloud_entry(&text, &cloud).with_context(|| format!("{}", path.display()))?;
    merge_cloud(opts, &entry, path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

fn clouds_yaml_paths() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("OS_CLIENT_CONFIG_FILE") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("clouds.yaml"));
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(x).join("openstack/clouds.yaml"));
    } else if let Some(h) = std::env::var_os("HOME") {
        v.push(PathBuf::from(h).join(".config/openstack/clouds.yaml"));
    }
    v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    v
}

/// The `clouds.<name>` mapping of a clouds.yaml, as JSON.
///
/// # Errors
/// Not YAML, or no such cloud.
pub fn cloud_entry(text: &str, cloud: &str) -> anyhow::Result<Value> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| anyhow!("not valid YAML: {e}"))?;
    let doc = docs.first().map(yaml_to_json).unwrap_or(Value::Null);
    let clouds = doc
        .get("clouds")
        .ok_or_else(|| anyhow!("no `clouds:` mapping"))?;
    clouds.get(cloud).cloned().ok_or_else(|| {
        let names: Vec<&str> = clouds
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        anyhow!("no cloud named {cloud:?} (found: {})", names.join(", "))
    })
}

fn yaml_to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(s.clone())),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) | Yaml::Real(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        _ => String::new(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

/// Copies a cloud's settings into options that are still unset.
fn merge_cloud(opts: &mut AuthOptions, c: &Value, base: &Path) {
    let s = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let auth = c.get("auth").cloned().unwrap_or(Value::Null);
    let a = |k: &str| s(auth.get(k));
    fill(&mut opts.auth_url, a("auth_url"));
    fill(&mut opts.username, a("username"));
    fill(&mut opts.user_id, a("user_id"));
    if opts.password.is_none() {
        opts.password = a("password").map(Secret::new);
    }
    if opts.token.is_none() {
        opts.token = a("token").map(Secret::new);
    }
    fill(
        &mut opts.project_name,
        a("project_name").or_else(|| a("tenant_name")),
    );
    fill(
        &mut opts.project_id,
        a("project_id").or_else(|| a("tenant_id")),
    );
    fill(
        &mut opts.user_domain_name,
        a("user_domain_name").or_else(|| a("domain_name")),
    );
    fill(
        &mut opts.user_domain_id,
        a("user_domain_id").or_else(|| a("domain_id")),
    );
    fill(
        &mut opts.project_domain_name,
        a("project_domain_name").or_else(|| a("domain_name")),
    );
    fill(
        &mut opts.project_domain_id,
        a("project_domain_id").or_else(|| a("domain_id")),
    );
    fill(&mut opts.region, s(c.get("region_name")));
    fill(&mut opts.interface, s(c.get("interface")));
    fill(&mut opts.image_url, s(c.get("image_endpoint_override")));
    if opts.tls.cacert.is_none() {
        opts.tls.cacert = s(c.get("cacert")).map(|p| base.join(p));
    }
    if c.get("verify") == Some(&Value::Bool(false)) || c.get("insecure") == Some(&Value::Bool(true))
    {
        opts.tls.insecure = true;
    }
}

fn fill(slot: &mut Option<String>, v: Option<String>) {
    if slot.is_none() {
        *slot = v;
    }
}

/// Resolves the options into a token and an image endpoint, asking Keystone when needed.
///
/// # Errors
/// Missing options, or Keystone refusing the credentials or lacking an image endpoint.
pub fn authenticate(http: &Http, opts: &AuthOptions) -> anyhow::Result<Session> {
    if let Some(token) = &opts.token {
        let Some(url) = &opts.image_url else {
            bail!("a token (--os-auth-token / OS_AUTH_TOKEN) needs the image endpoint: --os-image-url or OS_IMAGE_URL")
        };
        check_endpoint("OS_IMAGE_URL (--os-image-url)", url)?;
        return Ok(Session {
            token: token.clone(),
            image_url: image_root(url),
        });
    }
    let Some(auth_url) = &opts.auth_url else {
        bail!(
            "no credentials: set OS_AUTH_TOKEN and OS_IMAGE_URL, or OS_AUTH_URL with OS_USERNAME and \
             OS_PASSWORD (Keystone v3), or OS_CLOUD with a clouds.yaml"
        )
    };
    let password = opts
        .password
        .as_ref()
        .ok_or_else(|| anyhow!("OS_AUTH_URL is set but OS_PASSWORD is not"))?;
    check_endpoint("OS_AUTH_URL (--os-auth-url)", auth_url)?;
    let url = tokens_url(auth_url);
    let body = password_request(opts, password)?;
    let reply = http
        .expect(
            Method::POST,
            &url,
            None,
            Body::Json("application/json", body),
        )
        .map_err(|e| redact(e, password))
        .context("Keystone authentication")?;
    let token = reply
        .header("x-subject-token")
        .map(Secret::new)
        .ok_or_else(|| {
            anyhow!(
                "Keystone's reply from {} has no X-Subject-Token header",
                shown(&url)
            )
        })?;
    let image_url = match &opts.image_url {
        Some(u) => {
            check_endpoint("OS_IMAGE_URL (--os-image-url)", u)?;
            u.clone()
        }
        None => {
            let doc = reply
                .json()
                .with_context(|| format!("Keystone's reply from {}", shown(&url)))?;
            let u = catalog_image_url(&doc, opts.interface.as_deref(), opts.region.as_deref())?;
            check_endpoint("the catalog's image endpoint", &u)?;
            u
        }
    };
    if auth_url.starts_with("https://") && image_url.starts_with("http://") {
        errln!(
            "glimpse: warning: the token from {} (https) goes to the image endpoint {} over plain http",
            shown(auth_url),
            shown(&image_url)
        );
    }
    Ok(Session {
        token,
        image_url: image_root(&image_url),
    })
}

/// `url` as it may be printed (no userinfo, query or fragment).
fn shown(url: &str) -> String {
    crate::remote::url::shown(url)
}

/// An endpoint (Keystone's or the image service's) must be an `http://` or `https://` URL
/// without a query or fragment (glimpse appends `/v2/...` or `/v3/...` to it, which a query
/// would swallow).
///
/// # Errors
/// Any other form.
pub fn check_endpoint(what: &str, url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{what} {:?} is not an http:// or https:// URL", shown(url));
    }
    if url.contains(['?', '#']) {
        bail!(
            "{what} {:?} has a query or fragment; an endpoint has none",
            shown(url)
        );
    }
    Ok(())
}

/// A Keystone error that quotes the request (a misbehaving server or a proxy in front of it)
/// must not print the password: every occurrence becomes `***`.
fn redact(e: anyhow::Error, password: &Secret) -> anyhow::Error {
    let secret = password.expose();
    let text = format!("{e:#}");
    if secret.is_empty() || !text.contains(secret) {
        return e;
    }
    anyhow!("{}", text.replace(secret, "***"))
}

/// `{auth_url}/auth/tokens`, adding `/v3` when the URL names no version (as keystoneauth does
/// for a versionless endpoint with v3 options).
pub fn tokens_url(auth_url: &str) -> String {
    let base = auth_url.trim_end_matches('/');
    if base.ends_with("/v3") {
        format!("{base}/auth/tokens")
    } else {
        format!("{base}/v3/auth/tokens")
    }
}

/// The v3 password request body (never logged: it holds the password).
///
/// # Errors
/// Neither a user name nor a user id.
pub fn password_request(opts: &AuthOptions, password: &Secret) -> anyhow::Result<Value> {
    let user = if let Some(id) = &opts.user_id {
        json!({"id": id, "password": password.expose()})
    } else if let Some(name) = &opts.username {
        json!({"name": name, "domain": domain(&opts.user_domain_name, &opts.user_domain_id), "password": password.expose()})
    } else {
        bail!("Keystone password authentication needs OS_USERNAME or OS_USER_ID")
    };
    let mut auth = json!({"identity": {"methods": ["password"], "password": {"user": user}}});
    let project = if let Some(id) = &opts.project_id {
        Some(json!({"id": id}))
    } else {
        opts.project_name
            .as_ref()
            .map(|name| json!({"name": name, "domain": domain(&opts.project_domain_name, &opts.project_domain_id)}))
    };
    if let Some(p) = project {
        auth["scope"] = json!({"project": p});
    }
    Ok(json!({"auth": auth}))
}

/// A domain by name or id; the OpenStack client's default domain id is `default`.
fn domain(name: &Option<String>, id: &Option<String>) -> Value {
    match (name, id) {
        (Some(n), _) => json!({"name": n}),
        (None, Some(i)) => json!({"id": i}),
        (None, None) => json!({"id": "default"}),
    }
}

/// The `image` endpoint of a v3 token's catalog for the interface (public by default; the v2
/// spellings `publicURL` etc. are accepted) and region.
///
/// # Errors
/// No catalog, or no matching endpoint.
pub fn catalog_image_url(
    doc: &Value,
    interface: Option<&str>,
    region: Option<&str>,
) -> anyhow::Result<String> {
    let interface = interface.unwrap_or("public").trim_end_matches("URL");
    let catalog = doc
        .pointer("/token/catalog")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("Keystone's token has no service catalog (is a project scope set? OS_PROJECT_NAME or OS_PROJECT_ID)"))?;
    for service in catalog
        .iter()
        .filter(|s| s.get("type").and_then(Value::as_str) == Some("image"))
    {
        let endpoints = service
            .get("endpoints")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for e in endpoints {
            let field = |k: &str| e.get(k).and_then(Value::as_str);
            if field("interface") != Some(interface) {
                continue;
            }
            if let Some(r) = region {
                if field("region_id") != Some(r) && field("region") != Some(r) {
                    continue;
                }
            }
            if let Some(url) = field("url") {
                return Ok(url.to_string());
            }
        }
    }
    Err(anyhow!(
        "Keystone's catalog has no image endpoint for interface {interface}{} (set OS_IMAGE_URL to name one)",
        region.map(|r| format!(" in region {r}")).unwrap_or_default()
    ))
}

/// The image service root: catalog URLs may or may not end in a version.
pub fn image_root(url: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix("/v2")
        .unwrap_or(u)
        .trim_end_matches('/')
        .to_string()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_keystone_error_that_quotes_the_password_prints_stars() {
        let pw = Secret::new("hunter2-PASSWORD");
        let e = anyhow!(
            r#"POST http://k/v3/auth/tokens failed with HTTP 401: bad credentials in {{"password":"hunter2-PASSWORD"}}"#
        );
        let shown = format!("{:#}", redact(e, &pw));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(r#""password":"***""#), "{shown}");
        let e = anyhow!("no reply");
        assert_eq!(format!("{:#}", redact(e, &pw)), "no reply");
    }

    #[test]
    fn image_endpoints_need_a_scheme_and_no_query() {
        assert!(check_endpoint("e", "https://glance:9292").is_ok());
        assert!(check_endpoint("e", "http://glance:9292/image").is_ok());
        for bad in [
            "glance:9292",
            "file:///etc/passwd",
            "http://h/?sig=S",
            "http://h/#f",
        ] {
            let e = check_endpoint("e", bad).unwrap_err().to_string();
            assert!(!e.contains("sig=S"), "{e}");
        }
    }

    use super::*;

    #[test]
    fn catalog_picks_interface_and_region() {
        let doc = json!({"token": {"catalog": [
            {"type": "compute", "endpoints": [{"interface": "public", "region_id": "R1", "url": "http://nova"}]},
            {"type": "image", "endpoints": [
                {"interface": "internal", "region_id": "R1", "url": "http://glance-int:9292"},
                {"interface": "public", "region_id": "R1", "region": "R1", "url": "http://glance-r1:9292/v2/"},
                {"interface": "public", "region_id": "R2", "region": "R2", "url": "http://glance-r2:9292"}
            ]}
        ]}});
        assert_eq!(
            catalog_image_url(&doc, None, None).unwrap(),
            "http://glance-r1:9292/v2/"
        );
        assert_eq!(
            catalog_image_url(&doc, Some("publicURL"), Some("R2")).unwrap(),
            "http://glance-r2:9292"
        );
        assert_eq!(
            catalog_image_url(&doc, Some("internal"), None).unwrap(),
            "http://glance-int:9292"
        );
        assert!(catalog_image_url(&doc, Some("admin"), None).is_err());
        assert!(catalog_image_url(&json!({"token": {}}), None, None).is_err());
        assert_eq!(
            image_root("http://glance-r1:9292/v2/"),
            "http://glance-r1:9292"
        );
    }

    #[test]
    fn tokens_url_adds_v3_once() {
        assert_eq!(
            tokens_url("http://ks:5000"),
            "http://ks:5000/v3/auth/tokens"
        );
        assert_eq!(
            tokens_url("http://ks:5000/v3/"),
            "http://ks:5000/v3/auth/tokens"
        );
        assert_eq!(
            tokens_url("https://ks/identity/v3"),
            "https://ks/identity/v3/auth/tokens"
        );
    }

    #[test]
    fn password_body_names_or_ids() {
        let mut o = AuthOptions {
            username: Some("alice".into()),
            project_name: Some("demo".into()),
            user_domain_name: Some("Users".into()),
            ..AuthOptions::default()
        };
        let b = password_request(&o, &Secret::new("pw")).unwrap();
        assert_eq!(
            b["auth"]["identity"]["password"]["user"],
            json!({"name": "alice", "domain": {"name": "Users"}, "password": "pw"})
        );
        assert_eq!(
            b["auth"]["scope"],
            json!({"project": {"name": "demo", "domain": {"id": "default"}}})
        );
        o.user_id = Some("u1".into());
        o.project_id = Some("p1".into());
        let b = password_request(&o, &Secret::new("pw")).unwrap();
        assert_eq!(
            b["auth"]["identity"]["password"]["user"],
            json!({"id": "u1", "password": "pw"})
        );
        assert_eq!(b["auth"]["scope"], json!({"project": {"id": "p1"}}));
        assert!(password_request(&AuthOptions::default(), &Secret::new("pw")).is_err());
    }

    #[test]
    fn clouds_yaml_fills_unset_options_only() {
        let text = "clouds:\n  mycloud:\n    auth:\n      auth_url: https://ks.example:5000/v3\n      username: bob\n      password: s3cret\n      project_name: proj\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: RegionTwo\n    interface: internal\n    verify: false\n    cacert: ca.pem\n  other: {}\n";
        let entry = cloud_entry(text, "mycloud").unwrap();
        let mut o = AuthOptions {
            region: Some("FromEnv".into()),
            ..AuthOptions::default()
        };
        merge_cloud(&mut o, &entry, Path::new("/cfg"));
        assert_eq!(o.auth_url.as_deref(), Some("https://ks.example:5000/v3"));
        assert_eq!(o.username.as_deref(), Some("bob"));
        assert_eq!(o.password, Some(Secret::new("s3cret")));
        assert_eq!(o.project_name.as_deref(), Some("proj"));
        assert_eq!(o.region.as_deref(), Some("FromEnv"));
        assert_eq!(o.interface.as_deref(), Some("internal"));
        assert!(o.tls.insecure);
        assert_eq!(o.tls.cacert.as_deref(), Some(Path::new("/cfg/ca.pem")));
        let err = cloud_entry(text, "nope").unwrap_err().to_string();
        assert!(err.contains("mycloud") && err.contains("other"), "{err}");
        assert!(cloud_entry("clouds: [", "x").is_err());
    }
}
