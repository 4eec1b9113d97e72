use worker::*; #[event(fetch)] async fn main(_r: Request, _e: Env, _c: Context) -> Result<Response> { Response::ok("x") }
