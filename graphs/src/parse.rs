//! Step one of checking: spanned TOML -> raw, located graph pieces, with structural diagnostics.
//!
//! Every key is looked at, so that one run reports every unknown key, missing key and value of
//! the wrong type (serde's `deny_unknown_fields` would stop at the first).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Diagnostic, SourceFile};
use crate::names::{NodeName, PipelineName, PortName, SubmodelName};
use crate::signature::PortType;
use crate::spec::{BatchSpec, DEFAULT_QUEUE, DEFAULT_VERSION, DeviceSpec, LOCAL_NODE, NodeSpec, Source, SubmodelSpec};
use crate::suggest::did_you_mean;

pub(crate) type Span = Range<usize>;

/// A submodel as written, with the spans needed to point at its keys.
pub(crate) struct RawSubmodel {
    pub(crate) spec: SubmodelSpec,
    pub(crate) file: Arc<SourceFile>,
    pub(crate) name_span: Span,
    /// Value spans by key (`kind`, `weights`, `params`, `params.config`, ...).
    pub(crate) keys: HashMap<String, Span>,
    /// The spec is complete enough to ask its kind for a signature.
    pub(crate) complete: bool,
}

impl RawSubmodel {
    /// The best span for a key: its own, else its parent table's, else the submodel's name.
    pub(crate) fn span_of(&self, key: Option<&str>) -> Span {
        let mut key = key;
        while let Some(k) = key {
            if let Some(s) = self.keys.get(k) {
                return s.clone();
            }
            key = k.rsplit_once('.').map(|(parent, _)| parent);
        }
        self.name_span.clone()
    }
}

pub(crate) struct RawInput {
    pub(crate) name: PortName,
    pub(crate) ty: Option<PortType>,
    pub(crate) span: Span,
}

pub(crate) struct RawOutput {
    pub(crate) name: PortName,
    pub(crate) target: Option<(NodeName, PortName)>,
    pub(crate) span: Span,
}

pub(crate) struct RawBinding {
    pub(crate) port: PortName,
    pub(crate) port_span: Span,
    pub(crate) source: Source,
    pub(crate) span: Span,
}

pub(crate) struct RawNode {
    pub(crate) name: NodeName,
    pub(crate) span: Span,
    pub(crate) submodel: Option<(SubmodelName, Span)>,
    pub(crate) inputs: Vec<RawBinding>,
    /// Ports whose binding was written but could not be parsed (already reported): treated as
    /// connected, so the checker does not pile further errors on the same mistake.
    pub(crate) broken: Vec<PortName>,
}

pub(crate) struct RawPipeline {
    pub(crate) name: PipelineName,
    pub(crate) file: Arc<SourceFile>,
    pub(crate) name_span: Span,
    pub(crate) inputs: Vec<RawInput>,
    pub(crate) outputs: Vec<RawOutput>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) nodes: Vec<RawNode>,
}

/// A node as written (`[nodes.NAME]`).
pub(crate) struct RawNodeDecl {
    pub(crate) spec: NodeSpec,
    pub(crate) file: Arc<SourceFile>,
    pub(crate) name_span: Span,
}

/// Everything parsed from one file.
#[derive(Default)]
pub(crate) struct RawFile {
    pub(crate) submodels: Vec<RawSubmodel>,
    pub(crate) pipelines: Vec<RawPipeline>,
    pub(crate) nodes: Vec<RawNodeDecl>,
}

const ROOT_KEYS: &[&str] = &["submodels", "pipelines", "nodes", "training"];
const SUBMODEL_KEYS: &[&str] =
    &["kind", "weights", "version", "device", "replicas", "batch", "queue", "params", "node"];
const NODE_DECL_KEYS: &[&str] = &["addr"];
const BATCH_KEYS: &[&str] = &["max_size", "max_delay_ms"];
const PIPELINE_KEYS: &[&str] = &["inputs", "outputs", "deadline_ms", "nodes"];
const NODE_KEYS: &[&str] = &["submodel", "inputs"];

/// Parses one source, appending diagnostics.
pub(crate) fn parse_file(file: &Arc<SourceFile>, diags: &mut Vec<Diagnostic>) -> RawFile {
    let mut p = Parser { file, diags };
    p.file()
}

struct Parser<'a> {
    file: &'a Arc<SourceFile>,
    diags: &'a mut Vec<Diagnostic>,
}

/// A key as the checker reads it, and its value. A mistyped key with one likely meaning
/// (`weigths`) is reported, then read as that key, so that what depends on it (a submodel's
/// signature, a node's ports) is still checked in the same run.
type Entry<'t, 'i> = (&'t str, &'t Spanned<DeValue<'i>>);

impl Parser<'_> {
    fn error(&mut self, span: &Span, msg: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(self.file.locate(span)), msg));
    }

    fn file(&mut self) -> RawFile {
        let text = self.file.text.clone();
        let (root, errors) = DeTable::parse_recoverable(&text);
        if !errors.is_empty() {
            for e in errors {
                let span = e.span().unwrap_or(0..0);
                let mut msg = format!("invalid TOML: {}", e.message());
                // Name the key of a duplicate (the parser only says "duplicate key").
                if e.message() == "duplicate key"
                    && let Some(key) = text.get(span.clone()).filter(|k| !k.is_empty() && !k.contains('\n'))
                {
                    msg = format!("invalid TOML: duplicate key `{}`", key.trim_matches(['[', ']', ' ']));
                }
                self.error(&span, msg);
            }
            return RawFile::default();
        }
        let root = root.into_inner();
        let mut out = RawFile::default();
        for (key, value) in self.known(&root, "the graph file", ROOT_KEYS) {
            match key {
                "submodels" => {
                    if let Some(t) = self.table(value, "`submodels`") {
                        for (k, v) in t.iter() {
                            if let Some(s) = self.submodel(k, v) {
                                out.submodels.push(s);
                            }
                        }
                    }
                }
                "nodes" => {
                    if let Some(t) = self.table(value, "`nodes`") {
                        for (k, v) in t.iter() {
                            if let Some(n) = self.node_decl(k, v) {
                                out.nodes.push(n);
                            }
                        }
                    }
                }
                // Training jobs are checked by maas-train against the checked graph.
                "training" => {}
                _ => {
                    if let Some(t) = self.table(value, "`pipelines`") {
                        for (k, v) in t.iter() {
                            if let Some(p) = self.pipeline(k, v) {
                                out.pipelines.push(p);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Reports keys of `t` not in `allowed` (with the closest allowed key, if one is close);
    /// returns the known entries, and each unknown key that has a close match not written
    /// elsewhere in `t`, read as that match.
    fn known<'t, 'i>(&mut self, t: &'t DeTable<'i>, what: &str, allowed: &[&'static str]) -> Vec<Entry<'t, 'i>>
    where
        'i: 't,
    {
        let present: HashSet<&str> = t.iter().map(|(k, _)| k.get_ref().as_ref()).collect();
        let mut recovered = HashSet::new();
        let mut out = Vec::new();
        for (k, v) in t.iter() {
            let name: &'t str = k.get_ref().as_ref();
            if allowed.contains(&name) {
                out.push((name, v));
                continue;
            }
            let guess = did_you_mean(name, allowed.iter().copied());
            let hint = guess.map(|g| format!("; did you mean `{g}`?")).unwrap_or_default();
            self.error(
                &k.span(),
                format!("unknown key `{name}` in {what}; expected one of: {}{hint}", allowed.join(", ")),
            );
            if let Some(g) = guess
                && !present.contains(g)
                && recovered.insert(g)
            {
                out.push((g, v));
            }
        }
        out
    }

    fn table<'t, 'i>(&mut self, v: &'t Spanned<DeValue<'i>>, what: &str) -> Option<&'t DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                self.error(&v.span(), format!("{what} must be a table, not {}", type_name(other)));
                None
            }
        }
    }

    fn string(&mut self, v: &Spanned<DeValue<'_>>, what: &str) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            other => {
                self.error(&v.span(), format!("{what} must be a string, not {}", type_name(other)));
                None
            }
        }
    }

    /// An integer in `min..=max`.
    fn int(&mut self, v: &Spanned<DeValue<'_>>, what: &str, min: u64, max: u64) -> Option<u64> {
        let DeValue::Integer(i) = v.get_ref() else {
            self.error(&v.span(), format!("{what} must be an integer, not {}", type_name(v.get_ref())));
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => Some(n as u64),
            Ok(n) if n < min as i64 => {
                self.error(&v.span(), format!("{what} must be at least {min}, got {n}"));
                None
            }
            _ => {
                self.error(&v.span(), format!("{what} must be at most {max}, got {}", i.as_str()));
                None
            }
        }
    }

    fn name<T>(
        &mut self,
        k: &Spanned<std::borrow::Cow<'_, str>>,
        what: &str,
        make: fn(String) -> Result<T, String>,
    ) -> Option<T> {
        match make(k.get_ref().to_string()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.error(&k.span(), format!("invalid {what} name: {e}"));
                None
            }
        }
    }

    fn submodel(&mut self, k: &Spanned<std::borrow::Cow<'_, str>>, v: &Spanned<DeValue<'_>>) -> Option<RawSubmodel> {
        let name = self.name(k, "submodel", SubmodelName::new)?;
        let what = format!("submodel `{name}`");
        let t = self.table(v, &what)?;
        let mut spec = SubmodelSpec::new(name.clone(), String::new());
        spec.base_dir = self.file.base_dir.clone();
        spec.version = DEFAULT_VERSION.into();
        spec.queue = DEFAULT_QUEUE;
        let mut keys = HashMap::new();
        let mut kind = None;
        for (key, val) in self.known(t, &what, SUBMODEL_KEYS) {
            keys.insert(key.to_string(), val.span());
            let kw = format!("`{key}` of {what}");
            match key {
                "kind" => kind = self.string(val, &kw),
                "weights" => {
                    if let Some(w) = self.string(val, &kw) {
                        if w.is_empty() {
                            self.error(&val.span(), format!("{kw} may not be empty"));
                        } else {
                            spec.weights = Some(spec.resolve(w));
                        }
                    }
                }
                "version" => {
                    if let Some(s) = self.string(val, &kw) {
                        if s.trim().is_empty() {
                            self.error(&val.span(), format!("{kw} may not be empty"));
                        } else {
                            spec.version = s;
                        }
                    }
                }
                "device" => {
                    if let Some(s) = self.string(val, &kw) {
                        match s.parse::<DeviceSpec>() {
                            Ok(d) => spec.device = d,
                            Err(e) => self.error(&val.span(), format!("{kw}: {e}")),
                        }
                    }
                }
                "replicas" => {
                    if let Some(n) = self.int(val, &kw, 1, 1024) {
                        spec.replicas = n as usize;
                    }
                }
                "queue" => {
                    if let Some(n) = self.int(val, &kw, 1, 1 << 24) {
                        spec.queue = n as usize;
                    }
                }
                "batch" => spec.batch = self.batch(val, &what),
                "node" => {
                    if let Some(nodes) = self.node_names(val, &kw) {
                        for (n, span) in &nodes {
                            keys.insert(format!("node.{n}"), span.clone());
                        }
                        spec.node = nodes.into_iter().map(|(n, _)| n).collect();
                    }
                }
                "params" => {
                    if let Some(pt) = self.table(val, &kw) {
                        for (pk, pv) in pt.iter() {
                            keys.insert(format!("params.{}", pk.get_ref()), pv.span());
                        }
                        match <toml::Table as serde::Deserialize>::deserialize(toml::de::ValueDeserializer::from(
                            val.clone(),
                        )) {
                            Ok(table) => spec.params = table,
                            Err(e) => self.error(&val.span(), format!("{kw}: {}", e.message())),
                        }
                    }
                }
                _ => unreachable!("filtered by known()"),
            }
        }
        match kind {
            Some(kind) => spec.kind = kind,
            None if !keys.contains_key("kind") => {
                self.error(&k.span(), format!("{what} is missing the required key `kind`"));
            }
            None => {}
        }
        let complete = !spec.kind.is_empty();
        Some(RawSubmodel { spec, file: self.file.clone(), name_span: k.span(), keys, complete })
    }

    /// `[nodes.NAME] addr = "HOST:PORT"`.
    fn node_decl(&mut self, k: &Spanned<std::borrow::Cow<'_, str>>, v: &Spanned<DeValue<'_>>) -> Option<RawNodeDecl> {
        let name = k.get_ref().to_string();
        if let Err(e) = crate::names::check_name(&name) {
            self.error(&k.span(), format!("invalid node name `{name}`: {e}"));
            return None;
        }
        if name == LOCAL_NODE {
            self.error(&k.span(), format!("`{LOCAL_NODE}` names the serving process and cannot be declared as a node"));
            return None;
        }
        let what = format!("node `{name}`");
        let t = self.table(v, &what)?;
        let mut addr = None;
        for (key, val) in self.known(t, &what, NODE_DECL_KEYS) {
            let kw = format!("`{key}` of {what}");
            if let Some(a) = self.string(val, &kw) {
                match a.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                        addr = Some(a);
                    }
                    _ => self.error(&val.span(), format!("{kw}: `{a}` is not HOST:PORT (e.g. \"127.0.0.1:7101\")")),
                }
            }
        }
        if addr.is_none() && !t.contains_key("addr") {
            self.error(&k.span(), format!("{what} is missing the required key `addr`"));
        }
        // Declared even with a bad `addr` (already reported), so that placements on it are not
        // reported again as undeclared.
        Some(RawNodeDecl {
            spec: NodeSpec { name, addr: addr.unwrap_or_default() },
            file: self.file.clone(),
            name_span: k.span(),
        })
    }

    /// A submodel's `node`: one name or a non-empty list of distinct names.
    fn node_names(&mut self, v: &Spanned<DeValue<'_>>, what: &str) -> Option<Vec<(String, Span)>> {
        let names = match v.get_ref() {
            DeValue::String(s) => vec![(s.to_string(), v.span())],
            DeValue::Array(items) => {
                let mut names = Vec::new();
                for item in items.iter() {
                    let DeValue::String(s) = item.get_ref() else {
                        self.error(
                            &item.span(),
                            format!("{what}: expected node names (strings), found {}", type_name(item.get_ref())),
                        );
                        return None;
                    };
                    if names.iter().any(|(n, _): &(String, Span)| n == s.as_ref()) {
                        self.error(&item.span(), format!("{what}: node `{s}` is named twice"));
                        return None;
                    }
                    names.push((s.to_string(), item.span()));
                }
                if names.is_empty() {
                    self.error(&v.span(), format!("{what}: the list of nodes may not be empty"));
                    return None;
                }
                names
            }
            other => {
                self.error(
                    &v.span(),
                    format!("{what}: expected a node name or a list of them, found {}", type_name(other)),
                );
                return None;
            }
        };
        Some(names)
    }

    fn batch(&mut self, v: &Spanned<DeValue<'_>>, owner: &str) -> Option<BatchSpec> {
        let what = format!("`batch` of {owner}");
        let t = self.table(v, &what)?;
        let mut max_size = None;
        let mut delay = 0;
        let mut written = false;
        for (key, val) in self.known(t, &what, BATCH_KEYS) {
            let kw = format!("`batch.{}` of {owner}", key);
            match key {
                "max_size" => {
                    written = true;
                    max_size = self.int(val, &kw, 1, 1 << 20);
                }
                _ => delay = self.int(val, &kw, 0, 3_600_000)?,
            }
        }
        let Some(max_size) = max_size else {
            if !written {
                self.error(&v.span(), format!("{what} is missing the required key `max_size`"));
            }
            return None;
        };
        Some(BatchSpec { max_size: max_size as usize, max_delay: Duration::from_millis(delay) })
    }

    fn pipeline(&mut self, k: &Spanned<std::borrow::Cow<'_, str>>, v: &Spanned<DeValue<'_>>) -> Option<RawPipeline> {
        let name = self.name(k, "pipeline", PipelineName::new)?;
        let what = format!("pipeline `{name}`");
        let t = self.table(v, &what)?;
        let mut p = RawPipeline {
            name,
            file: self.file.clone(),
            name_span: k.span(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            deadline: None,
            nodes: Vec::new(),
        };
        let mut written = HashSet::new();
        for (key, val) in self.known(t, &what, PIPELINE_KEYS) {
            written.insert(key);
            let kw = format!("`{}` of {what}", key);
            match key {
                "inputs" => {
                    let Some(it) = self.table(val, &kw) else { continue };
                    for (ik, iv) in it.iter() {
                        let Some(iname) = self.name(ik, "input", PortName::new) else { continue };
                        let ty = self.string(iv, &format!("the type of input `{iname}`")).and_then(|s| {
                            s.parse::<PortType>()
                                .map_err(|e| self.error(&iv.span(), format!("input `{iname}`: {e}")))
                                .ok()
                        });
                        p.inputs.push(RawInput { name: iname, ty, span: ik.span() });
                    }
                    if it.is_empty() {
                        self.error(&val.span(), format!("{what} declares no inputs"));
                    }
                }
                "outputs" => {
                    let Some(ot) = self.table(val, &kw) else { continue };
                    for (ok, ov) in ot.iter() {
                        let Some(oname) = self.name(ok, "output", PortName::new) else { continue };
                        let target = self.string(ov, &format!("output `{oname}`")).and_then(|s| {
                            match parse_source(&s) {
                                Ok(Source::Node { node, port }) => Some((node, port)),
                                Ok(Source::Input(_)) | Err(_) => {
                                    self.error(&ov.span(), format!("output `{oname}` must name a node's output port as \"node.port\", not `{s}`"));
                                    None
                                }
                            }
                        });
                        p.outputs.push(RawOutput { name: oname, target, span: ov.span() });
                    }
                    if ot.is_empty() {
                        self.error(&val.span(), format!("{what} declares no outputs"));
                    }
                }
                "deadline_ms" => {
                    p.deadline = self.int(val, &kw, 1, 86_400_000).map(Duration::from_millis);
                }
                _ => {
                    let Some(nt) = self.table(val, &kw) else { continue };
                    for (nk, nv) in nt.iter() {
                        if let Some(n) = self.node(nk, nv, &p.name) {
                            p.nodes.push(n);
                        }
                    }
                    if nt.is_empty() {
                        self.error(&val.span(), format!("{what} has no nodes"));
                    }
                }
            }
        }
        for req in ["inputs", "outputs", "nodes"] {
            if !written.contains(req) {
                self.error(&k.span(), format!("{what} is missing the required key `{req}`"));
            }
        }
        Some(p)
    }

    fn node(
        &mut self,
        k: &Spanned<std::borrow::Cow<'_, str>>,
        v: &Spanned<DeValue<'_>>,
        pipeline: &PipelineName,
    ) -> Option<RawNode> {
        let name = self.name(k, "node", NodeName::new)?;
        let what = format!("node `{name}` of pipeline `{pipeline}`");
        let t = self.table(v, &what)?;
        let mut node = RawNode { name, span: k.span(), submodel: None, inputs: Vec::new(), broken: Vec::new() };
        let mut written = false;
        for (key, val) in self.known(t, &what, NODE_KEYS) {
            let kw = format!("`{}` of {what}", key);
            if key == "submodel" {
                written = true;
                if let Some(s) = self.string(val, &kw) {
                    match SubmodelName::new(s) {
                        Ok(n) => node.submodel = Some((n, val.span())),
                        Err(e) => self.error(&val.span(), format!("{kw}: {e}")),
                    }
                }
                continue;
            }
            let Some(it) = self.table(val, &kw) else { continue };
            for (pk, pv) in it.iter() {
                let Some(port) = self.name(pk, "port", PortName::new) else { continue };
                let Some(s) = self.string(pv, &format!("input `{port}` of node `{}`", node.name)) else {
                    node.broken.push(port);
                    continue;
                };
                match parse_source(&s) {
                    Ok(source) => node.inputs.push(RawBinding { port, port_span: pk.span(), source, span: pv.span() }),
                    Err(e) => {
                        self.error(&pv.span(), format!("input `{port}` of node `{}`: {e}", node.name));
                        node.broken.push(port);
                    }
                }
            }
        }
        if !written {
            self.error(&k.span(), format!("{what} is missing the required key `submodel`"));
        }
        Some(node)
    }
}

/// Parses `"$input"` or `"node.port"`.
pub fn parse_source(s: &str) -> Result<Source, String> {
    let bad = || format!("invalid source `{s}`; expected \"$input\" or \"node.port\"");
    if let Some(input) = s.strip_prefix('$') {
        return PortName::new(input).map(Source::Input).map_err(|_| bad());
    }
    let (node, port) = s.split_once('.').ok_or_else(bad)?;
    match (NodeName::new(node), PortName::new(port)) {
        (Ok(node), Ok(port)) => Ok(Source::Node { node, port }),
        _ => Err(bad()),
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}
