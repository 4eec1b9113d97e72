//! The two things the edge reads from a request URL, without a URL parser: the path
//! with its query (what a drain request signs), and one query parameter. The runtime
//! hands the worker a URL it has already parsed and serialised (WHATWG), so splitting
//! that text is enough; the `url` crate (~38 KiB of the worker's wasm) is not linked.

/// `/path?query` of an absolute URL (the fragment dropped; `/` when there is no path).
pub fn path_and_query(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(url, |i| &url[i + 3..]);
    let from_path = match after_scheme.find(['/', '?', '#']) {
        Some(i) => &after_scheme[i..],
        None => "",
    };
    let without_fragment = from_path.split('#').next().unwrap_or_default();
    if without_fragment.is_empty() || without_fragment.starts_with('?') {
        // Only reached for URLs the runtime would have given a `/` path.
        return "/";
    }
    without_fragment
}

/// The first value of query parameter `name` in an absolute URL, decoded as a form
/// (`+` is a space, `%XX` a byte; invalid UTF-8 replaced).
pub fn query_param(url: &str, name: &str) -> Option<String> {
    // No `?` comes before the query in an absolute URL (not in the authority either).
    let query = url.split('#').next()?.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name).then(|| form_decode(v))
    })
}

/// One `application/x-www-form-urlencoded` name or value, decoded: `+` is a space,
/// `%XX` a byte (a `%` not followed by two hex digits stays as it is), invalid UTF-8
/// replaced.
pub fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_query_match_what_a_url_parser_gives() {
        for (url, want) in [
            (
                "https://edge.example/drain/lease?shard=1&max=5",
                "/drain/lease?shard=1&max=5",
            ),
            ("http://127.0.0.1:8787/drain/ack", "/drain/ack"),
            ("https://edge.example/a%3F%23%2Fb?c#frag", "/a%3F%23%2Fb?c"),
            ("https://edge.example/p?", "/p?"),
            ("https://user:pw@edge.example:8443/x/y?z=1#f", "/x/y?z=1"),
            ("https://edge.example/", "/"),
            ("https://edge.example", "/"),
            ("https://edge.example?q=1", "/"),
        ] {
            assert_eq!(path_and_query(url), want, "{url}");
        }
    }

    #[test]
    fn query_params_are_form_decoded_first_one_wins() {
        let url =
            "https://e.example/dev/bench?iterations=300&country=F%52&a+b=c+d&x=1&x=2&bad=%zz%4";
        assert_eq!(query_param(url, "iterations").as_deref(), Some("300"));
        assert_eq!(query_param(url, "country").as_deref(), Some("FR"));
        assert_eq!(query_param(url, "a b").as_deref(), Some("c d"));
        assert_eq!(query_param(url, "x").as_deref(), Some("1"));
        assert_eq!(query_param(url, "bad").as_deref(), Some("%zz%4"));
        assert_eq!(query_param(url, "missing"), None);
        assert_eq!(query_param("https://e.example/p", "x"), None);
        assert_eq!(
            query_param("https://e.example/p?flag", "flag").as_deref(),
            Some("")
        );
        assert_eq!(
            query_param("https://e.example/p?x=%C3%A9#x=2", "x").as_deref(),
            Some("é")
        );
        assert_eq!(
            query_param("https://e.example?q=1", "q").as_deref(),
            Some("1")
        );
    }
}
