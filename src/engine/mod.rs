//! engine: the state language. To be written: render (Jinja) -> parse (SLS) -> graph
//! (requisites) -> order (modes) -> run.
