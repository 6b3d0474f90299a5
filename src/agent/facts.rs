//! A node's facts, published at `/eden/nodes/<name>/facts` for targeting and templates: os,
//! kernel, hostname, fqdn, ips, cpus, memory and labels (plus the Salt-style grain names the
//! local runs already use: `os`, `osrelease`, `kernelrelease`, `num_cpus`, `mem_total`).

use serde_json::{json, Map, Value};

use super::records::NodeRecord;

/// This machine's facts as seen by the node `record`.
pub fn gather(record: &NodeRecord) -> Map<String, Value> {
    let mut f = crate::cli::apply::local_facts(&record.name);
    let host = crate::cli::apply::hostname();
    f.insert("hostname".into(), json!(host));
    f.insert("fqdn".into(), json!(fqdn(&host)));
    f.insert("ips".into(), json!(ips()));
    if let Some(n) = f.get("num_cpus").cloned() {
        f.insert("cpus".into(), n);
    }
    if let Some(m) = f.get("mem_total").cloned() {
        f.insert("memory".into(), m);
    }
    f.insert("labels".into(), json!(record.labels));
    f.insert("datastore".into(), json!(record.datastore));
    f.insert("eden_version".into(), json!(env!("CARGO_PKG_VERSION")));
    f
}

/// The canonical name of `host` from the resolver, or `host` itself.
fn fqdn(host: &str) -> String {
    let Ok(c) = std::ffi::CString::new(host) else {
        return host.to_string();
    };
    // SAFETY: getaddrinfo gets a valid C string and hints; the result list is freed below.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_flags = libc::AI_CANONNAME;
        hints.ai_family = libc::AF_UNSPEC;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(c.as_ptr(), std::ptr::null(), &hints, &mut res) != 0 || res.is_null() {
            return host.to_string();
        }
        let name = if (*res).ai_canonname.is_null() {
            host.to_string()
        } else {
            std::ffi::CStr::from_ptr((*res).ai_canonname)
                .to_string_lossy()
                .into_owned()
        };
        libc::freeaddrinfo(res);
        name
    }
}

/// The machine's IPv4 and IPv6 addresses, loopback excluded.
fn ips() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list that is walked read-only and freed once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match (*addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                        if !ip.is_loopback() {
                            out.push(ip.to_string());
                        }
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        if !ip.is_loopback() {
                            out.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_carry_labels_and_the_host() {
        let rec = NodeRecord {
            name: "web-1".into(),
            peer_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
            datastore: "never".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            raft_id: 0,
            version: String::new(),
        };
        let f = gather(&rec);
        assert_eq!(f["labels"]["role"], "web");
        assert_eq!(f["id"], "web-1");
        assert_eq!(f["hostname"], crate::cli::apply::hostname());
        assert!(f["cpus"].as_u64().unwrap_or(0) >= 1, "{f:?}");
        assert!(f["memory"].as_u64().unwrap_or(0) > 0, "{f:?}");
        assert!(f["ips"].is_array());
    }
}
