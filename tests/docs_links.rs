//! The documentation links only to what the repository holds. In README.md and docs/*.md,
//! every relative link (and image) names a file or folder inside the repository, and
//! every `#anchor` names a heading of its target, by the slugs GitHub gives headings.
//! Links to other sites are not followed. No API server needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use pulldown_cmark::{BrokenLink, CowStr, Event, LinkType, Options, Parser, Tag, TagEnd};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents checked, relative to the repository: README.md and docs/*.md.
fn documents(repo: &Path) -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo.join("docs"))
        .expect("docs/")
        .map(|entry| PathBuf::from("docs").join(entry.unwrap().file_name()))
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, PathBuf::from("README.md"));
    docs
}

/// A link as written, and the line it is on.
#[derive(Debug)]
struct Link {
    line: usize,
    dest: String,
}

/// What GitHub renders from one Markdown document: its links (and images), the anchors
/// of its headings, and references to link definitions it lacks (`[text][missing]`).
#[derive(Debug, Default)]
struct Rendered {
    links: Vec<Link>,
    anchors: Vec<String>,
    undefined: Vec<Link>,
}

fn render(text: &str) -> Rendered {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut undefined = vec![];
    // `[text][ref]` and `[text][]` without a definition render as plain text on GitHub:
    // a link the author meant that does not exist. A bare `[text]` is ordinary prose.
    let callback = |broken: BrokenLink<'_>| -> Option<(CowStr<'_>, CowStr<'_>)> {
        if !matches!(broken.link_type, LinkType::Shortcut | LinkType::ShortcutUnknown) {
            undefined.push(Link { line: line_of(broken.span.start), dest: broken.reference.to_string() });
        }
        None
    };
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let parser = Parser::new_with_broken_link_callback(text, options, Some(callback));
    let mut out = Rendered::default();
    let mut slugs = Slugs::default();
    let mut heading: Option<String> = None;
    for (event, range) in parser.into_offset_iter() {
        match event {
            Event::Start(Tag::Link { dest_url, link_type, .. } | Tag::Image { dest_url, link_type, .. })
                if link_type != LinkType::Email =>
            {
                out.links.push(Link { line: line_of(range.start), dest: dest_url.to_string() });
            }
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                out.anchors.push(slugs.next(&heading.take().unwrap_or_default()));
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            _ => {}
        }
    }
    out.undefined = undefined;
    out
}

/// GitHub's anchors for a document's headings (github-slugger): the heading's text in
/// lower case, without punctuation and symbols (letters, digits, `_`, `-` and spaces
/// stay), each space a `-`; a repeated slug gets `-1`, `-2`, ….
#[derive(Default)]
struct Slugs {
    seen: BTreeSet<String>,
    repeats: BTreeMap<String, usize>,
}

impl Slugs {
    fn next(&mut self, heading: &str) -> String {
        let base = slug(heading);
        let mut anchor = base.clone();
        while self.seen.contains(&anchor) {
            let n = self.repeats.entry(base.clone()).or_default();
            *n += 1;
            anchor = format!("{base}-{n}");
        }
        self.seen.insert(anchor.clone());
        anchor
    }
}

fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `%20` and the like, as a browser decodes a link's path.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex =
            bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a link goes to another site (or another scheme): `https://…`, `mailto:…`.
fn is_external(dest: &str) -> bool {
    dest.starts_with("//")
        || dest.split_once(':').is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
}

/// `target` (a path in a link of `doc`) as a path relative to the repository, or None
/// when it climbs out of it. A leading `/` is the repository's root, as on GitHub.
fn resolve(doc: &Path, target: &str) -> Option<PathBuf> {
    let base = if target.starts_with('/') { PathBuf::new() } else { doc.parent()?.to_path_buf() };
    let mut parts: Vec<Component> = base.components().collect();
    for part in Path::new(target.trim_start_matches('/')).components() {
        match part {
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(_) => parts.push(part),
            _ => {}
        }
    }
    Some(parts.iter().collect())
}

/// Every problem with the links of `doc` (relative to `repo`), one line each:
/// `README.md:22: ../shared/SPEC.md: leaves the repository`.
fn check_document(repo: &Path, doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo.join(doc)).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    let rendered = render(&text);
    let mut anchors_of: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    anchors_of.insert(doc.to_path_buf(), rendered.anchors.clone());
    let mut problems = vec![];
    for link in &rendered.undefined {
        problems.push(format!(
            "{}:{}: [{}]: no link definition of that name",
            doc.display(),
            link.line,
            link.dest
        ));
    }
    for link in rendered.links.iter().filter(|l| !is_external(&l.dest)) {
        let at = format!("{}:{}: {}", doc.display(), link.line, link.dest);
        let (path, anchor) = match link.dest.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (link.dest.as_str(), None),
        };
        let path = percent_decode(path.split('?').next().unwrap_or_default());
        let target = if path.is_empty() { Some(doc.to_path_buf()) } else { resolve(doc, &path) };
        let Some(target) = target else {
            problems.push(format!("{at}: leaves the repository (a reader who clones it does not have it)"));
            continue;
        };
        let on_disk = repo.join(&target);
        if !on_disk.exists() {
            problems.push(format!("{at}: {} does not exist", target.display()));
            continue;
        }
        let Some(anchor) = anchor.map(percent_decode) else { continue };
        if target.extension().is_none_or(|e| e != "md") || on_disk.is_dir() {
            problems
                .push(format!("{at}: #{anchor} on {}, which is not a Markdown document", target.display()));
            continue;
        }
        let anchors = anchors_of.entry(target.clone()).or_insert_with(|| {
            render(&std::fs::read_to_string(&on_disk).unwrap_or_else(|e| panic!("{}: {e}", target.display())))
                .anchors
        });
        if !anchors.contains(&anchor) {
            problems.push(format!(
                "{at}: {} has no heading with the anchor #{anchor}; its anchors: {}",
                target.display(),
                anchors.join(", ")
            ));
        }
    }
    problems
}

#[test]
fn every_relative_link_in_readme_and_docs_resolves_in_the_repository() {
    let repo = repo();
    let docs = documents(&repo);
    assert!(docs.len() > 5, "{docs:?}");
    let mut links = 0;
    let mut problems = vec![];
    for doc in &docs {
        links += render(&std::fs::read_to_string(repo.join(doc)).unwrap()).links.len();
        problems.extend(check_document(&repo, doc));
    }
    assert!(links > 50, "found only {links} links: is the Markdown parsed?");
    assert!(problems.is_empty(), "{} broken links:\n{}", problems.len(), problems.join("\n"));
}

/// The anchors GitHub gives the headings this repository's documents link to.
#[test]
fn anchors_follow_githubs_slugs() {
    let text = "\
# Lifecycle: how keyward runs a key
## Design decisions (where this differs from, or adds to, SPEC.md)
## gRPC `ext_authz` (Envoy, Istio, Envoy Gateway, Contour, kgateway)
## What happens when …
## A minimum lead time (`rotation.minFlipLead`)
### The local cluster (`hack/cluster.sh`)
## *Emphasis* and [a link](x.md) &amp; more
## Notes
## Notes
Setext heading
--------------
";
    assert_eq!(
        render(text).anchors,
        [
            "lifecycle-how-keyward-runs-a-key",
            "design-decisions-where-this-differs-from-or-adds-to-specmd",
            "grpc-ext_authz-envoy-istio-envoy-gateway-contour-kgateway",
            "what-happens-when-",
            "a-minimum-lead-time-rotationminfliplead",
            "the-local-cluster-hackclustersh",
            "emphasis-and-a-link--more",
            "notes",
            "notes-1",
            "setext-heading",
        ]
    );
}

/// What the checker finds in a small repository made for it: each kind of broken link
/// named with its file, line and why; code, other sites and good links left alone.
#[test]
fn broken_links_are_reported_with_file_line_and_reason() {
    let repo = std::env::temp_dir().join(format!("keyward-docs-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    std::fs::write(repo.join("docs/other.md"), "# Other\n## Known section\n").unwrap();
    std::fs::write(repo.join("docs/data.yaml"), "a: 1\n").unwrap();
    std::fs::write(
        repo.join("README.md"),
        "\
# Title
[good](docs/other.md#known-section) [dir](docs/) [self](#title) <https://example.com/x>
[outside](../shared/SPEC.md)
[missing file](docs/gone.md)
[bad anchor](docs/other.md#unknown)

| table | [in a cell](docs/other.md#nope) |
|---|---|

`[in code](nowhere.md)` and [undefined][nowhere] and [prose in brackets]
```
[in a code block](nowhere.md)
```
![image](docs/missing.svg) [anchor on yaml](docs/data.yaml#L1) [spaced](docs/other%2Emd)
",
    )
    .unwrap();
    let problems = check_document(&repo, Path::new("README.md"));
    std::fs::remove_dir_all(&repo).unwrap();
    let want = [
        "README.md:10: [nowhere]: no link definition of that name",
        "README.md:3: ../shared/SPEC.md: leaves the repository (a reader who clones it does not have it)",
        "README.md:4: docs/gone.md: docs/gone.md does not exist",
        "README.md:5: docs/other.md#unknown: docs/other.md has no heading with the anchor #unknown; \
         its anchors: other, known-section",
        "README.md:7: docs/other.md#nope: docs/other.md has no heading with the anchor #nope; \
         its anchors: other, known-section",
        "README.md:14: docs/missing.svg: docs/missing.svg does not exist",
        "README.md:14: docs/data.yaml#L1: #L1 on docs/data.yaml, which is not a Markdown document",
    ];
    assert_eq!(problems, want);
}
