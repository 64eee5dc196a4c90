//! Links: the values stages hand each other outside the channels (a learner's weight cell, the
//! length of its schedule, where a resumed data stream starts, which table a log stage owns).
//!
//! A link is a typed key ([`Link<T>`]). After every stage has validated its parameters (a pure
//! check), the plan asks each configured stage to declare the links it provides (with their
//! value) and the links it reads; that link step runs before any stage is built, whatever the
//! order of the stages in the spec, and its result is frozen and listed by `Plan::links`. A
//! stage reads a value in `create` through `StageContext::links`.

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

/// A typed key: the name is what the plan lists, `T` what providers give and readers get.
pub struct Link<T> {
    name: std::borrow::Cow<'static, str>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Any + Send + Sync> Link<T> {
    /// A link with a fixed name (`train.weights`).
    pub const fn new(name: &'static str) -> Self {
        Link {
            name: std::borrow::Cow::Borrowed(name),
            _t: PhantomData,
        }
    }
    /// A link whose name is made at validation (`logs.table.steps`).
    pub fn named(name: String) -> Self {
        Link {
            name: std::borrow::Cow::Owned(name),
            _t: PhantomData,
        }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A link's one provider is another stage (named): the caller words the error for its
/// parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlreadyProvided {
    pub by: String,
}

/// One link of a plan: its value type, the stage that provides it and those that read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ty: &'static str,
    pub provider: Option<String>,
    pub readers: Vec<String>,
}

#[derive(Default)]
struct Entry {
    ty: &'static str,
    provider: Option<String>,
    readers: Vec<String>,
    value: Option<Arc<dyn Any + Send + Sync>>,
}

/// The link table being filled in the link step.
#[derive(Default)]
pub struct LinkTable {
    entries: BTreeMap<String, Entry>,
}

/// What one stage declares in the link step.
pub struct Linker<'a> {
    stage: &'a str,
    table: &'a mut LinkTable,
}

impl<'a> Linker<'a> {
    pub(crate) fn new(stage: &'a str, table: &'a mut LinkTable) -> Self {
        Linker { stage, table }
    }
    /// This stage provides `link` with `value`. A link has one provider: `Err` names the stage
    /// that already provides it.
    pub fn provide<T: Any + Send + Sync>(
        &mut self,
        link: &Link<T>,
        value: T,
    ) -> Result<(), AlreadyProvided> {
        let e = self.table.entries.entry(link.name.to_string()).or_default();
        e.ty = std::any::type_name::<T>();
        match &e.provider {
            Some(other) if other != self.stage => Err(AlreadyProvided { by: other.clone() }),
            _ => {
                e.provider = Some(self.stage.to_string());
                e.value = Some(Arc::new(value));
                Ok(())
            }
        }
    }
    /// This stage reads `link` (whether or not any stage provides it).
    pub fn read<T: Any + Send + Sync>(&mut self, link: &Link<T>) {
        let e = self.table.entries.entry(link.name.to_string()).or_default();
        if e.ty.is_empty() {
            e.ty = std::any::type_name::<T>();
        }
        if !e.readers.iter().any(|r| r == self.stage) {
            e.readers.push(self.stage.to_string());
        }
    }
}

/// The frozen links of a plan, shared by its stages (empty until the link step has run).
#[derive(Clone, Default)]
pub struct Links(Arc<OnceLock<LinkTable>>);

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list().iter().map(|l| &l.name))
            .finish()
    }
}

impl Links {
    pub(crate) fn freeze(&self, table: LinkTable) {
        let _ = self.0.set(table);
    }
    /// The value provided for `link`, if a stage of the plan provides it.
    pub fn get<T: Any + Send + Sync>(&self, link: &Link<T>) -> Option<Arc<T>> {
        let e = self.0.get()?.entries.get(link.name.as_ref())?;
        e.value.clone()?.downcast::<T>().ok()
    }
    /// The stages that declared they read `link`.
    pub fn readers<T>(&self, link: &Link<T>) -> Vec<String> {
        self.0
            .get()
            .and_then(|t| t.entries.get(link.name.as_ref()))
            .map(|e| e.readers.clone())
            .unwrap_or_default()
    }
    /// Every link of the plan, by name.
    pub fn list(&self) -> Vec<LinkInfo> {
        let Some(t) = self.0.get() else {
            return Vec::new();
        };
        t.entries
            .iter()
            .map(|(name, e)| LinkInfo {
                name: name.clone(),
                ty: e.ty,
                provider: e.provider.clone(),
                readers: e.readers.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_provider_many_readers_typed_values() {
        const STEPS: Link<u64> = Link::new("train.steps");
        let mut t = LinkTable::default();
        Linker::new("mask", &mut t).read(&STEPS);
        Linker::new("student", &mut t).provide(&STEPS, 300).unwrap();
        assert_eq!(
            Linker::new("other", &mut t).provide(&STEPS, 5),
            Err(AlreadyProvided {
                by: "student".into()
            })
        );
        let links = Links::default();
        assert!(links.get(&STEPS).is_none(), "nothing before the link step");
        links.freeze(t);
        assert_eq!(links.get(&STEPS).as_deref(), Some(&300));
        assert_eq!(links.readers(&STEPS), vec!["mask".to_string()]);
        let wrong: Link<String> = Link::named("train.steps".into());
        assert!(
            links.get(&wrong).is_none(),
            "another type under the name is not handed out"
        );
        let l = &links.list()[0];
        assert_eq!((l.provider.as_deref(), l.ty), (Some("student"), "u64"));
    }
}
