//! Genius mode: rewrites of a compiled plan, each one recorded with its reason so
//! `eden plan --mode genius` can explain it. The rewritten plan then runs in parallel.
//!
//! The rewrites, in this order:
//! 1. **pkgrepo before pkg**: every `pkg.*` step requires every `pkgrepo.*` step, because
//!    packages install from the configured repositories.
//! 2. **parent directory before its files**: a `file.*` step requires the `file.directory` step
//!    of its nearest managed ancestor directory.
//! 3. **pkg aggregation**: `pkg.installed` steps become one step with a `pkgs:` list (one package
//!    transaction). Only steps with the same requisites and no requisite path between them are
//!    grouped, so the group starts exactly when each of them would have and requisites keep
//!    holding; Salt's aggregation ignored them (salt#47628).
//! 4. **deduplication**: steps with the same module, function, arguments and requisites run
//!    once; the others' dependents wait for the one that is kept.
//!
//! An edge a rewrite would add that closes a cycle is not added; the skip is recorded too.
//! Never aggregated or de-duplicated: steps that take part in a `prereq`, have cross-node run
//! options (`serialize`, `sync`, `target_limit`), are watched by another step through
//! `onchanges`, `onfail` or `watch` (merged, one step's changes or failure would answer for
//! all), or are named by a `${{ steps.ID.FIELD }}`. Pure: no I/O.

use serde_json::Value;

use super::compile::{Dep, Plan, PlanStep, ReqKind, Rewrite};

struct Work {
    steps: Vec<PlanStep>,
    alive: Vec<bool>,
    /// What each step was merged into (itself if not merged).
    rep: Vec<usize>,
}

impl Work {
    fn find(&self, mut i: usize) -> usize {
        while self.rep[i] != i {
            i = self.rep[i];
        }
        i
    }

    /// Requisites of `i` resolved to live steps, without self-loops.
    fn deps(&self, i: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.steps[i]
            .deps
            .iter()
            .map(|d| self.find(d.step))
            .filter(|&d| d != i)
            .collect();
        out.dedup();
        out
    }

    /// True if `from` must finish before `to` can start (a requisite path `from` -> ... -> `to`).
    fn reaches(&self, from: usize, to: usize) -> bool {
        let n = self.steps.len();
        let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
        for i in (0..n).filter(|&i| self.alive[i]) {
            for d in self.deps(i) {
                succ[d].push(i);
            }
        }
        let mut seen = vec![false; n];
        let mut stack = vec![from];
        while let Some(x) = stack.pop() {
            if x == to {
                return true;
            }
            if std::mem::replace(&mut seen[x], true) {
                continue;
            }
            stack.extend(succ[x].iter().copied());
        }
        false
    }

    fn involved_in_prereq(&self, i: usize) -> bool {
        let s = &self.steps[i];
        s.is_check() || s.prereq_check.is_some() || s.deps.iter().any(|d| d.kind == ReqKind::Prereq)
    }

    /// Steps that must stay as written: those in a `prereq`, and those with cross-node run
    /// options (merging one would change what the other nodes wait for).
    fn left_alone(&self, i: usize) -> bool {
        self.involved_in_prereq(i)
            || self.steps[i].coordinated()
            || self.gates_others(i)
            || self.referenced(i)
    }

    /// Another step reacts to how `i` went (onchanges, onfail, watch, their `_any`/`_all`
    /// forms): merged, `i` would answer for the whole group, so it stays as written.
    fn gates_others(&self, i: usize) -> bool {
        (0..self.steps.len()).filter(|&x| self.alive[x]).any(|x| {
            self.steps[x]
                .deps
                .iter()
                .any(|d| self.find(d.step) == i && d.kind != ReqKind::Require)
        })
    }

    /// A `${{ steps.ID.FIELD }}` names `i`: its own result must exist, so it is not merged.
    fn referenced(&self, i: usize) -> bool {
        let needle = format!("steps.{}.", self.steps[i].id);
        self.steps.iter().any(|s| {
            s.has_refs && serde_json::to_string(&s.args).is_ok_and(|a| a.contains(&needle))
        })
    }

    /// `a` and `b` wait on the same steps in the same ways, so one step can stand for both
    /// without running earlier or later than either would have.
    fn same_requisites(&self, a: usize, b: usize) -> bool {
        let set = |i: usize| -> std::collections::BTreeSet<(ReqKind, usize)> {
            self.steps[i]
                .deps
                .iter()
                .map(|d| (d.kind, self.find(d.step)))
                .collect()
        };
        set(a) == set(b)
    }

    fn requires(&self, i: usize, j: usize) -> bool {
        self.deps(i).contains(&j)
    }

    /// Merges `other` into `keep`: `keep` takes `other`'s requisites; `other` disappears.
    fn merge(&mut self, keep: usize, other: usize) {
        let extra: Vec<Dep> = self.steps[other].deps.clone();
        for d in extra {
            if self.find(d.step) != keep && !self.steps[keep].deps.contains(&d) {
                self.steps[keep].deps.push(d);
            }
        }
        self.alive[other] = false;
        self.rep[other] = keep;
    }
}

fn parent_dirs(path: &str) -> impl Iterator<Item = &str> {
    let mut cur = path.trim_end_matches('/');
    std::iter::from_fn(move || {
        let cut = cur.rfind('/')?;
        cur = &cur[..cut];
        Some(if cur.is_empty() { "/" } else { cur })
    })
}

/// The packages a `pkg.installed` step asks for, as `pkgs` entries: a name, or `{name: version}`
/// when the step pins a version (so aggregation keeps it).
fn pkg_names(s: &PlanStep) -> Vec<Value> {
    match (s.args.get("pkgs"), s.args.get("version")) {
        (Some(Value::Array(a)), _) => a.clone(),
        (_, Some(v)) if !v.is_null() => {
            let version = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            vec![serde_json::json!({ s.name.clone(): version })]
        }
        _ => vec![Value::String(s.name.clone())],
    }
}

/// Applies the genius rewrites to `plan` and records them in `plan.rewrites`.
pub fn rewrite(plan: &mut Plan) {
    let n = plan.steps.len();
    let mut w = Work {
        steps: std::mem::take(&mut plan.steps),
        alive: vec![true; n],
        rep: (0..n).collect(),
    };
    let mut rewrites = Vec::new();
    let mut add_edge = |w: &mut Work, from: usize, to: usize, kind: &str, reason: String| {
        // `to` requires `from`.
        if w.requires(to, from) {
            return;
        }
        let ids = vec![w.steps[from].id.clone(), w.steps[to].id.clone()];
        if w.reaches(to, from) {
            rewrites.push(Rewrite {
                kind: format!("{kind} (skipped)"),
                steps: ids,
                reason: format!(
                    "{reason}; not added because the states already order the other way"
                ),
            });
            return;
        }
        w.steps[to].deps.push(Dep {
            kind: ReqKind::Require,
            step: from,
        });
        rewrites.push(Rewrite {
            kind: kind.to_string(),
            steps: ids,
            reason,
        });
    };

    // 1. pkgrepo before pkg.
    let repos: Vec<usize> = (0..n)
        .filter(|&i| w.steps[i].module == "pkgrepo" && !w.steps[i].is_check())
        .collect();
    let pkgs: Vec<usize> = (0..n)
        .filter(|&i| w.steps[i].module == "pkg" && !w.steps[i].is_check())
        .collect();
    for &p in &pkgs {
        for &r in &repos {
            let reason = format!(
                "{} {} installs from configured repositories, so {} {} runs first",
                w.steps[p].function_name(),
                w.steps[p].name,
                w.steps[r].function_name(),
                w.steps[r].name
            );
            add_edge(&mut w, r, p, "pkgrepo-before-pkg", reason);
        }
    }

    // 2. A parent directory before the files in it.
    let dirs: Vec<usize> = (0..n)
        .filter(|&i| {
            w.steps[i].module == "file"
                && w.steps[i].function == "directory"
                && !w.steps[i].is_check()
        })
        .collect();
    for f in 0..n {
        if w.steps[f].module != "file" || w.steps[f].is_check() {
            continue;
        }
        let name = w.steps[f].name.clone();
        let parent = parent_dirs(&name).find_map(|p| {
            dirs.iter()
                .copied()
                .find(|&d| d != f && w.steps[d].name.trim_end_matches('/') == p)
        });
        if let Some(d) = parent {
            let reason = format!(
                "{name} lies under {}, so the directory is made first",
                w.steps[d].name
            );
            add_edge(&mut w, d, f, "parent-dir-before-file", reason);
        }
    }

    // 3. pkg.installed aggregation into one transaction per independent group.
    let installs: Vec<usize> = pkgs
        .iter()
        .copied()
        .filter(|&i| w.steps[i].function == "installed" && !w.left_alone(i))
        .collect();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &i in &installs {
        let mut placed = false;
        for g in groups.iter_mut() {
            let head = g[0];
            if !w.reaches(head, i) && !w.reaches(i, head) && w.same_requisites(head, i) {
                w.merge(head, i);
                g.push(i);
                placed = true;
                break;
            }
        }
        if !placed {
            groups.push(vec![i]);
        }
    }
    for g in groups.into_iter().filter(|g| g.len() > 1) {
        let head = g[0];
        let mut names: Vec<Value> = Vec::new();
        for &i in &g {
            for p in pkg_names(&w.steps[i]) {
                if !names.contains(&p) {
                    names.push(p);
                }
            }
        }
        let list: Vec<String> = names
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        let refresh = g
            .iter()
            .any(|&i| w.steps[i].args.get("refresh") == Some(&Value::Bool(true)));
        let args = &mut w.steps[head].args;
        args.insert("pkgs".into(), Value::Array(names));
        // Versions now travel in `pkgs`; one refresh covers the transaction.
        args.remove("version");
        if refresh {
            args.insert("refresh".into(), Value::Bool(true));
        }
        rewrites.push(Rewrite {
            kind: "pkg-aggregate".into(),
            steps: g.iter().map(|&i| w.steps[i].id.clone()).collect(),
            reason: format!(
                "these installs have the same requisites and none orders them against each \
                 other, so they run as one package transaction ({}) under {}",
                list.join(", "),
                w.steps[head].id
            ),
        });
    }

    // 4. Identical steps run once.
    for j in 0..n {
        if !w.alive[j] || w.left_alone(j) {
            continue;
        }
        let twin = (0..j).find(|&i| {
            w.alive[i]
                && !w.left_alone(i)
                && w.steps[i].module == w.steps[j].module
                && w.steps[i].function == w.steps[j].function
                && w.steps[i].args == w.steps[j].args
        });
        let Some(i) = twin else { continue };
        if w.reaches(i, j) || w.reaches(j, i) || !w.same_requisites(i, j) {
            continue;
        }
        w.merge(i, j);
        rewrites.push(Rewrite {
            kind: "dedupe".into(),
            steps: vec![w.steps[i].id.clone(), w.steps[j].id.clone()],
            reason: format!(
                "{} is identical to {} ({} with the same arguments), so it runs once",
                w.steps[j].id,
                w.steps[i].id,
                w.steps[i].function_name()
            ),
        });
    }

    // Rebuild: live steps in a topological order that keeps the old order where it can.
    let live: Vec<usize> = (0..n).filter(|&i| w.alive[i]).collect();
    let deps: Vec<Vec<usize>> = (0..n)
        .map(|i| if w.alive[i] { w.deps(i) } else { Vec::new() })
        .collect();
    let mut placed = vec![false; n];
    let mut order = Vec::with_capacity(live.len());
    while order.len() < live.len() {
        let next = live
            .iter()
            .copied()
            .find(|&i| !placed[i] && deps[i].iter().all(|&d| placed[d]))
            .expect("rewrites never add a cycle");
        placed[next] = true;
        order.push(next);
    }
    let mut new_index = vec![usize::MAX; n];
    for (k, &i) in order.iter().enumerate() {
        new_index[i] = k;
    }
    let mut steps = Vec::with_capacity(order.len());
    for &i in &order {
        let mut s = w.steps[i].clone();
        let mut new_deps: Vec<Dep> = Vec::new();
        for d in &s.deps {
            let t = w.find(d.step);
            if t == i {
                continue;
            }
            let nd = Dep {
                kind: d.kind,
                step: new_index[t],
            };
            if !new_deps.contains(&nd) {
                new_deps.push(nd);
            }
        }
        s.deps = new_deps;
        s.prereq_check = s.prereq_check.map(|c| new_index[w.find(c)]);
        s.prereq_check_of = s.prereq_check_of.map(|c| new_index[w.find(c)]);
        steps.push(s);
    }
    plan.steps = steps;
    plan.rewrites = rewrites;
}
