//! What a process holds, from `/proc`: threads, open files, resident memory, memory maps.

/// Threads of this process.
pub fn threads() -> usize {
    status_field("self", "Threads:") as usize
}

/// Open file descriptors of this process.
pub fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Resident memory of process `pid` (`"self"` for this one), in KiB.
pub fn rss_kib(pid: &str) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Memory mappings of process `pid`.
pub fn memory_maps(pid: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

fn status_field(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// What each open file descriptor of this process is: a path, or for a TCP socket its local
/// and remote ports and state (`tcp 127.0.0.1:5000 -> 127.0.0.1:41234 ESTABLISHED`), so a
/// test that finds files left open can say whose they are.
pub fn open_files_described() -> Vec<String> {
    let sockets = tcp_sockets();
    let mut described: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| {
            let target = target.to_string_lossy().into_owned();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'));
            match inode.and_then(|inode| sockets.get(inode)) {
                Some(socket) => socket.clone(),
                None => target,
            }
        })
        .collect();
    described.sort();
    described
}

/// This process's TCP sockets by inode, from `/proc/self/net/tcp` and `tcp6`.
fn tcp_sockets() -> std::collections::HashMap<String, String> {
    const STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    let port = |address: &str| {
        let port = address.rsplit(':').next().unwrap_or("0");
        u16::from_str_radix(port, 16).unwrap_or(0)
    };
    let mut sockets = std::collections::HashMap::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let state = usize::from_str_radix(fields[3], 16).unwrap_or(0);
            sockets.insert(
                fields[9].to_string(),
                format!(
                    "tcp :{} -> :{} {}",
                    port(fields[1]),
                    port(fields[2]),
                    STATES.get(state).unwrap_or(&"?")
                ),
            );
        }
    }
    sockets
}
