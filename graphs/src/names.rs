//! Validated names of submodels, pipelines, nodes and ports.
//!
//! Names are used in references such as `"node.port"` and `"$input"`, in metrics labels and in
//! URLs, so they are restricted to ASCII letters, digits, `_` and `-`, starting with a letter or
//! `_`.

use std::borrow::Borrow;
use std::fmt;

/// Checks a name; the error says what is wrong with it.
pub fn check_name(s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err("a name may not be empty".into()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(format!("`{s}` must start with a letter or `_`"));
        }
        _ => {}
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("`{s}` contains `{bad}`; names use letters, digits, `_` and `-`"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(s: String) -> Result<Self, String> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl $name {
            /// Validates and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let s = s.into();
                check_name(&s)?;
                Ok(Self(s))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a submodel (`[submodels.NAME]`).
    SubmodelName
);
name_type!(
    /// The name of a pipeline (`[pipelines.NAME]`).
    PipelineName
);
name_type!(
    /// The name of a node inside a pipeline.
    NodeName
);
name_type!(
    /// The name of a port: a kernel's input or output, or a pipeline's input or output.
    PortName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(SubmodelName::new("encoder_v2-small").is_ok());
        assert!(PipelineName::new("_x").is_ok());
        assert!(NodeName::new("").unwrap_err().contains("empty"));
        assert!(NodeName::new("2x").unwrap_err().contains("start with"));
        assert!(NodeName::new("a.b").unwrap_err().contains("`.`"));
    }
}
