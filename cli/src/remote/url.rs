//! URLs as inputs, and how they are shown.

/// True for an `http://` or `https://` URL (any case of the scheme).
pub fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// `url` as it may be printed: without userinfo (`user:password@`), query (a presigned URL's
/// signature) and fragment.
pub fn shown(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let url = url.get(..cut).unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(auth_end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

/// `url` without userinfo (`user:password@`), for a request glimpse builds itself on an
/// endpoint that has no query: the query it adds (a listing's marker) is worth showing.
pub fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            shown("https://user:pw@s3.example/b/disk.qcow2?X-Amz-Signature=abc#frag"),
            "https://s3.example/b/disk.qcow2"
        );
        assert_eq!(shown("http://h:8080/a/b"), "http://h:8080/a/b");
        assert_eq!(shown("http://h?sig=1"), "http://h");
        assert_eq!(
            without_userinfo("http://u:p@h:1/v2/images?marker=m"),
            "http://h:1/v2/images?marker=m"
        );
        assert_eq!(without_userinfo("http://h?a=b@c"), "http://h?a=b@c");
        assert!(is_url("HTTPS://x/y") && is_url("http://x") && !is_url("disk.qcow2"));
        assert!(!is_url("ftp://x") && !is_url("htt"));
    }
}
