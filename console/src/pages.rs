//! The console's pages: sign-in, the overview of the signed-in user's tenants, sign-out.
//! Plain HTML forms with redirect-after-post, so everything works without JavaScript.

use axum::{
    Form, Router,
    extract::State,
    http::{HeaderMap, Method, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::Api;

const ACCESS_COOKIE: &str = "nimbus_at";
const REFRESH_COOKIE: &str = "nimbus_rt";

/// The console router, to be nested at `/console`; `api` is the REST API router it calls.
pub fn router(api: Router) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/sign-in", get(sign_in_form).post(sign_in))
        .route("/sign-out", post(sign_out))
        .with_state(Api(api))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Nimbus</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;color:#1d2430}}\
         label{{display:block;margin:.8rem 0 .2rem}}input{{padding:.45rem;width:100%;box-sizing:border-box}}\
         button{{margin-top:1rem;padding:.5rem 1.2rem}}.error{{color:#a3262b}}table{{border-collapse:collapse;width:100%}}\
         td,th{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #dde}}</style></head>\
         <body><header><strong>Nimbus</strong> console</header><main>{}</main></body></html>",
        escape(title),
        body
    ))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> String {
    let age = max_age.map(|a| format!("; Max-Age={a}")).unwrap_or_default();
    format!("{name}={value}; Path=/console; HttpOnly; SameSite=Lax{age}")
}

fn session_cookies(tokens: &Value) -> Vec<String> {
    let s = |k: &str| tokens.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    vec![set_cookie(ACCESS_COOKIE, &s("access_token"), None), set_cookie(REFRESH_COOKIE, &s("refresh_token"), None)]
}

fn with_cookies(mut res: Response, cookies: Vec<String>) -> Response {
    for c in cookies {
        if let Ok(v) = c.parse() {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

fn sign_in_page(email: &str, error: Option<&str>) -> Html<String> {
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))).unwrap_or_default();
    page(
        "Sign in",
        &format!(
            "<h1>Sign in</h1>{error}<form method=\"post\" action=\"/console/sign-in\">\
             <label for=\"email\">E-mail</label><input id=\"email\" name=\"email\" type=\"email\" required value=\"{}\">\
             <label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" required>\
             <button type=\"submit\">Sign in</button></form>",
            escape(email)
        ),
    )
}

async fn sign_in_form() -> Html<String> {
    sign_in_page("", None)
}

#[derive(Deserialize)]
struct SignInForm {
    email: String,
    password: String,
}

async fn sign_in(State(api): State<Api>, Form(form): Form<SignInForm>) -> Response {
    let (status, body) = api
        .call(Method::POST, "/v1/auth/signin", None, Some(json!({"email": form.email, "password": form.password})))
        .await;
    if status == StatusCode::OK {
        with_cookies(Redirect::to("/console").into_response(), session_cookies(&body))
    } else {
        let detail = body.get("detail").and_then(Value::as_str).unwrap_or("sign-in failed").to_owned();
        (status, sign_in_page(&form.email, Some(&detail))).into_response()
    }
}

async fn sign_out(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(rt) = cookie(&headers, REFRESH_COOKIE) {
        api.call(Method::POST, "/v1/auth/signout", None, Some(json!({"refresh_token": rt}))).await;
    }
    with_cookies(
        Redirect::to("/console/sign-in").into_response(),
        vec![set_cookie(ACCESS_COOKIE, "", Some(0)), set_cookie(REFRESH_COOKIE, "", Some(0))],
    )
}

async fn overview(State(api): State<Api>, headers: HeaderMap) -> Response {
    let mut new_cookies = Vec::new();
    let mut token = cookie(&headers, ACCESS_COOKIE).filter(|t| !t.is_empty());
    let mut me = match &token {
        Some(t) => api.call(Method::GET, "/v1/me", Some(t), None).await,
        None => (StatusCode::UNAUTHORIZED, Value::Null),
    };
    // An expired access token is renewed with the refresh token, once.
    if me.0 == StatusCode::UNAUTHORIZED {
        if let Some(rt) = cookie(&headers, REFRESH_COOKIE).filter(|t| !t.is_empty()) {
            let (status, tokens) =
                api.call(Method::POST, "/v1/auth/refresh", None, Some(json!({"refresh_token": rt}))).await;
            if status == StatusCode::OK {
                new_cookies = session_cookies(&tokens);
                token = tokens.get("access_token").and_then(Value::as_str).map(str::to_owned);
                me = api.call(Method::GET, "/v1/me", token.as_deref(), None).await;
            }
        }
    }
    if me.0 != StatusCode::OK {
        return Redirect::to("/console/sign-in").into_response();
    }
    let (_, tenants) = api.call(Method::GET, "/v1/tenants?limit=100", token.as_deref(), None).await;
    let user = &me.1["user"];
    let rows: String = tenants["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|t| {
                    format!(
                        "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                        escape(t["name"].as_str().unwrap_or("")),
                        escape(t["display_name"].as_str().unwrap_or("")),
                        escape(t["role"].as_str().unwrap_or(""))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = format!(
        "<h1>Overview</h1><p>Signed in as <strong id=\"me\">{}</strong> ({})</p>\
         <h2>Tenants</h2><table id=\"tenants\"><thead><tr><th>Name</th><th>Display name</th><th>Role</th></tr></thead>\
         <tbody>{rows}</tbody></table>\
         <p><a href=\"/docs\">API reference</a></p>\
         <form method=\"post\" action=\"/console/sign-out\"><button type=\"submit\">Sign out</button></form>",
        escape(user["display_name"].as_str().unwrap_or("")),
        escape(user["email"].as_str().unwrap_or("")),
    );
    with_cookies(page("Overview", &body).into_response(), new_cookies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Json, body::Body, http::Request, routing::post as post_route};
    use tower::ServiceExt;

    /// A stand-in for the REST API with one user, so that the console's own behaviour (forms,
    /// cookies, redirects, escaping) is tested here; the real API is exercised in e2e/.
    fn fake_api() -> Router {
        Router::new()
            .route(
                "/v1/auth/signin",
                post_route(|Json(b): Json<Value>| async move {
                    if b["password"] == "right password" {
                        (StatusCode::OK, Json(json!({"access_token": "at1", "refresh_token": "rt1"})))
                    } else {
                        (StatusCode::UNAUTHORIZED, Json(json!({"detail": "invalid e-mail or <password>"})))
                    }
                }),
            )
            .route(
                "/v1/me",
                get(|h: HeaderMap| async move {
                    if h.get("authorization").is_some_and(|v| v == "Bearer at1") {
                        (StatusCode::OK, Json(json!({"user": {"display_name": "Ada <b>", "email": "ada@example.com"}})))
                    } else {
                        (StatusCode::UNAUTHORIZED, Json(json!({})))
                    }
                }),
            )
            .route(
                "/v1/tenants",
                get(|| async { Json(json!({"items": [{"name": "acme", "display_name": "Acme", "role": "admin"}]})) }),
            )
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn form(body: &str) -> Request<Body> {
        Request::post("/sign-in")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn sign_in_sets_session_cookies_and_redirects() {
        let app = router(fake_api());
        let (status, headers, _) = send(&app, form("email=ada%40example.com&password=right+password")).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers["location"], "/console");
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        assert!(cookies.iter().any(|c| c.starts_with("nimbus_at=at1;") && c.contains("HttpOnly")), "{cookies:?}");
    }

    #[tokio::test]
    async fn failed_sign_in_shows_the_escaped_error() {
        let app = router(fake_api());
        let (status, _, body) = send(&app, form("email=ada%40example.com&password=nope")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("invalid e-mail or &lt;password&gt;"), "{body}");
    }

    #[tokio::test]
    async fn overview_needs_a_session_and_lists_tenants() {
        let app = router(fake_api());
        let (status, headers, _) = send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!((status, headers["location"].to_str().unwrap()), (StatusCode::SEE_OTHER, "/console/sign-in"));
        let req = Request::get("/").header("cookie", "nimbus_at=at1").body(Body::empty()).unwrap();
        let (status, _, body) = send(&app, req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("Ada &lt;b&gt;") && body.contains("<td>acme</td>"), "{body}");
    }
}
