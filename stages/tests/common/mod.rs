//! Test helpers: a sink stage that records every item it receives in a static vector.
#![allow(dead_code)]

/// `sink!(Name, Item, STORE, "kind", |item| -> recorded)` defines a stage kind `kind` that pushes
/// `recorded` for every received `Item` into `STORE: Mutex<Vec<_>>`.
#[macro_export]
macro_rules! sink {
    ($name:ident, $item:ty, $store:ident, $kind:literal, |$x:ident| $rec:expr) => {
        struct $name;
        impl pipeline::StageDef for $name {
            type Params = pipeline::NoParams;
            const KIND: &'static str = $kind;
            const DOC: &'static str = "records items (tests)";
            fn inputs() -> Vec<pipeline::Port> {
                vec![pipeline::Port::of::<$item>("in", "items")]
            }
            fn outputs() -> Vec<pipeline::Port> {
                vec![]
            }
            fn create(
                _: &pipeline::NoParams,
                _: &pipeline::StageContext,
                _: usize,
            ) -> Result<Self, pipeline::StageError> {
                Ok($name)
            }
        }
        impl pipeline::Stage for $name {
            fn run(&mut self, io: &mut pipeline::StageIo) -> Result<(), pipeline::StageError> {
                while let Some($x) = io.recv::<$item>(0)? {
                    $store.lock().unwrap().push($rec);
                }
                Ok(())
            }
        }
    };
}
