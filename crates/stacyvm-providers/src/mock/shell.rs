//! The mock provider's command interpreter. It runs no program: it
//! understands a tiny shell-like language, enough for client development
//! and tests.
//!
//! An exec whose argv is `["/bin/sh", "-c", LINE, …]` (also `sh`, `bash`,
//! `dash`) interprets `LINE`; any other argv runs `argv[0]` as one command
//! with the rest as its arguments, unexpanded.
//!
//! The language:
//! - words split on blanks; `'single'` and `"double"` quotes, `\` escapes;
//!   `$NAME`, `${NAME}` and `$?` expand (also inside double quotes), a
//!   leading `~` is `$HOME`; no field splitting and no globbing (`*` stays
//!   as it is);
//! - `NAME=value` before a command sets it for that command, alone it sets
//!   it for the rest of the line;
//! - commands joined by `;`, newlines, `&&` and `||`; `#` comments;
//! - redirections `> FILE`, `>> FILE`, `2> FILE`, `2>> FILE`, `< FILE`,
//!   `>&2`, `2>&1` (`/dev/null` discards);
//! - pipes, `&`, subshells, `$(…)` and backquotes are refused with exit
//!   code 2.
//!
//! Commands: `:`, `true`, `false`, `echo [-n]`, `exit [N]`, `pwd`, `cd DIR`,
//! `env [NAME=VALUE…] [COMMAND…]`, `printenv [NAME…]`, `export NAME=VALUE`,
//! `cat [FILE…]` (stdin when no file or `-`), `ls [-a|-A] [PATH…]`,
//! `mkdir [-p] DIR…`, `touch FILE…`, `rm [-r] [-f] PATH…`, `sleep N[s|m|h|d]…`.
//! A command path such as `/bin/echo` names the same command. Anything else
//! exits with 127 and `mock: NAME: command not found (the mock provider runs
//! no programs)` on stderr.
//!
//! Files are the sandbox's files: every path goes through [`Root`], so
//! nothing outside the sandbox's root directory can be read or written.

use super::exec::Sink;
use super::fs::Root;
use stacyvm_agent_proto::error::errno::{EACCES, EEXIST, EISDIR};
use stacyvm_agent_proto::error::io_message;
use stacyvm_agent_proto::path::join;
use stacyvm_agent_proto::OutputStream;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

/// The message of a command that does not exist.
pub(crate) fn not_found_message(name: &str) -> String {
    format!("mock: {name}: command not found (the mock provider runs no programs)\n")
}

/// Exit code of a command that does not exist.
pub(crate) const NOT_FOUND: i32 = 127;
/// Exit code of a line the interpreter cannot parse.
pub(crate) const SYNTAX_ERROR: i32 = 2;

// ----- parsing ----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Unquoted text.
    Lit(String),
    /// Quoted text (never an assignment, never dropped when empty).
    Quoted(String),
    /// `$NAME`, `${NAME}`, `$?`.
    Var(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Word(Vec<Part>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Conn {
    Seq,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RedirKind {
    Write,
    Append,
    Read,
    /// `N>&M`: fd N goes where fd M goes.
    Dup(u8),
}

#[derive(Debug, Clone, PartialEq)]
struct Redir {
    fd: u8,
    kind: RedirKind,
    target: Word,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Command {
    words: Vec<Word>,
    redirs: Vec<Redir>,
}

impl Command {
    fn is_empty(&self) -> bool {
        self.words.is_empty() && self.redirs.is_empty()
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Script {
    items: Vec<(Conn, Command)>,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Word(Word),
    Op(Conn),
    Redir { fd: u8, kind: RedirKind },
}

/// A word being read.
#[derive(Default)]
struct WordBuf {
    parts: Vec<Part>,
    started: bool,
}

impl WordBuf {
    fn lit(&mut self, c: char) {
        self.started = true;
        match self.parts.last_mut() {
            Some(Part::Lit(s)) => s.push(c),
            _ => self.parts.push(Part::Lit(c.to_string())),
        }
    }

    fn quoted(&mut self, c: char) {
        self.started = true;
        match self.parts.last_mut() {
            Some(Part::Quoted(s)) => s.push(c),
            _ => self.parts.push(Part::Quoted(c.to_string())),
        }
    }

    fn var(&mut self, name: String) {
        self.started = true;
        self.parts.push(Part::Var(name));
    }

    fn finish(&mut self, toks: &mut Vec<Tok>) {
        if self.started {
            toks.push(Tok::Word(Word(std::mem::take(&mut self.parts))));
            self.started = false;
        }
    }

    /// A lone unquoted `0`, `1` or `2` right before `>`/`<` is a file
    /// descriptor number.
    fn take_fd(&mut self) -> Option<u8> {
        let fd = match self.parts.as_slice() {
            [Part::Lit(s)] if s == "0" || s == "1" || s == "2" => s.parse().ok()?,
            _ => return None,
        };
        self.parts.clear();
        self.started = false;
        Some(fd)
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn valid_name(s: &str) -> bool {
    s.chars().next().is_some_and(is_name_start) && s.chars().all(is_name_char)
}

/// Read a `$…` expansion starting at `chars[i] == '$'`; returns the index
/// after it.
fn dollar(chars: &[char], i: usize, word: &mut WordBuf, quoted: bool) -> Result<usize, String> {
    match chars.get(i + 1) {
        Some('?') => {
            word.var("?".to_string());
            Ok(i + 2)
        }
        Some('(') => Err("command substitution `$(...)` is not supported".into()),
        Some('{') => {
            let close = chars[i + 2..]
                .iter()
                .position(|&c| c == '}')
                .ok_or("unterminated `${`")?;
            let name: String = chars[i + 2..i + 2 + close].iter().collect();
            if name != "?" && !valid_name(&name) {
                return Err(format!("only `${{NAME}}` is supported, not `${{{name}}}`"));
            }
            word.var(name);
            Ok(i + 3 + close)
        }
        Some(&c) if is_name_start(c) => {
            let len = chars[i + 1..]
                .iter()
                .take_while(|&&c| is_name_char(c))
                .count();
            word.var(chars[i + 1..i + 1 + len].iter().collect());
            Ok(i + 1 + len)
        }
        Some(&c) if c.is_ascii_digit() => {
            word.var(c.to_string());
            Ok(i + 2)
        }
        _ => {
            if quoted {
                word.quoted('$');
            } else {
                word.lit('$');
            }
            Ok(i + 1)
        }
    }
}

fn tokenize(line: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = line.chars().collect();
    let mut toks = Vec::new();
    let mut word = WordBuf::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            ' ' | '\t' | '\r' => {
                word.finish(&mut toks);
                i += 1;
            }
            '\n' | ';' => {
                word.finish(&mut toks);
                if c == ';' && next == Some(';') {
                    return Err("`;;` is not supported".into());
                }
                toks.push(Tok::Op(Conn::Seq));
                i += 1;
            }
            '&' | '|' => {
                word.finish(&mut toks);
                let (op, single) = match c {
                    '&' => (Conn::And, "background jobs (`&`)"),
                    _ => (Conn::Or, "pipes (`|`)"),
                };
                if next != Some(c) {
                    return Err(format!("{single} are not supported"));
                }
                toks.push(Tok::Op(op));
                i += 2;
            }
            '>' | '<' => {
                let fd = match word.take_fd() {
                    Some(fd) => fd,
                    None => {
                        word.finish(&mut toks);
                        u8::from(c == '>')
                    }
                };
                i += 1;
                let kind = if c == '<' {
                    if matches!(chars.get(i), Some('<') | Some('>') | Some('&')) {
                        return Err("here-documents and `<>`/`<&` are not supported".into());
                    }
                    RedirKind::Read
                } else {
                    match chars.get(i) {
                        Some('>') => {
                            i += 1;
                            RedirKind::Append
                        }
                        Some('&') => {
                            let to = match chars.get(i + 1) {
                                Some('1') => 1,
                                Some('2') => 2,
                                _ => return Err("only `>&1` and `>&2` are supported".into()),
                            };
                            i += 2;
                            RedirKind::Dup(to)
                        }
                        Some('|') => return Err("`>|` is not supported".into()),
                        _ => RedirKind::Write,
                    }
                };
                if fd == 0 && kind != RedirKind::Read {
                    return Err("only `<` can redirect stdin".into());
                }
                toks.push(Tok::Redir { fd, kind });
            }
            '#' if !word.started => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\'' => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or("unterminated single quote")?;
                word.started = true;
                for &q in &chars[i + 1..i + 1 + close] {
                    word.quoted(q);
                }
                i += close + 2;
            }
            '"' => {
                word.started = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => match chars.get(i + 1) {
                            Some('\n') => i += 2,
                            Some(&e @ ('$' | '`' | '"' | '\\')) => {
                                word.quoted(e);
                                i += 2;
                            }
                            _ => {
                                word.quoted('\\');
                                i += 1;
                            }
                        },
                        Some('$') => i = dollar(&chars, i, &mut word, true)?,
                        Some('`') => {
                            return Err("command substitution (backquotes) is not supported".into())
                        }
                        Some(&q) => {
                            word.quoted(q);
                            i += 1;
                        }
                    }
                }
            }
            '\\' => match next {
                Some('\n') => i += 2,
                Some(n) => {
                    word.quoted(n);
                    i += 2;
                }
                None => {
                    word.lit('\\');
                    i += 1;
                }
            },
            '$' => i = dollar(&chars, i, &mut word, false)?,
            '`' => return Err("command substitution (backquotes) is not supported".into()),
            '(' | ')' => return Err("subshells and functions are not supported".into()),
            '~' if !word.started && matches!(next, None | Some('/') | Some(' ') | Some(';')) => {
                word.var("HOME".to_string());
                i += 1;
            }
            _ => {
                word.lit(c);
                i += 1;
            }
        }
    }
    word.finish(&mut toks);
    Ok(toks)
}

fn op_text(c: Conn) -> &'static str {
    match c {
        Conn::Seq => ";",
        Conn::And => "&&",
        Conn::Or => "||",
    }
}

/// Parse a command line; the error says what is wrong or unsupported.
pub(crate) fn parse(line: &str) -> Result<Script, String> {
    let mut items = Vec::new();
    let mut cur = Command::default();
    let mut conn = Conn::Seq;
    let mut toks = tokenize(line)?.into_iter();
    while let Some(tok) = toks.next() {
        match tok {
            Tok::Word(w) => cur.words.push(w),
            Tok::Redir { fd, kind } => {
                let target = match kind {
                    RedirKind::Dup(_) => Word::default(),
                    _ => match toks.next() {
                        Some(Tok::Word(w)) => w,
                        _ => return Err("a redirection has no file name".into()),
                    },
                };
                cur.redirs.push(Redir { fd, kind, target });
            }
            Tok::Op(op) => {
                if cur.is_empty() {
                    if op == Conn::Seq && conn == Conn::Seq {
                        continue; // an empty line
                    }
                    return Err(format!("unexpected `{}`", op_text(op)));
                }
                items.push((conn, std::mem::take(&mut cur)));
                conn = op;
            }
        }
    }
    if !cur.is_empty() {
        items.push((conn, cur));
    } else if conn != Conn::Seq {
        return Err(format!("the line ends with `{}`", op_text(conn)));
    }
    Ok(Script { items })
}

/// The line of a `sh -c LINE` argv, if it is one.
fn shell_line(argv: &[String]) -> Option<&str> {
    let sh = matches!(
        argv.first().map(String::as_str),
        Some(
            "/bin/sh"
                | "sh"
                | "/usr/bin/sh"
                | "/bin/bash"
                | "bash"
                | "/usr/bin/bash"
                | "/bin/dash"
                | "dash"
        )
    );
    if sh && argv.get(1).map(String::as_str) == Some("-c") {
        argv.get(2).map(String::as_str)
    } else {
        None
    }
}

// ----- running ----------------------------------------------------------------

/// What running one command leads to.
enum Flow {
    Next(i32),
    Exit(i32),
}

/// Where fd 1 or 2 of a command goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dest {
    Stdout,
    Stderr,
    File(usize),
    Null,
}

/// The output of one command, in order, by file descriptor (1 or 2).
#[derive(Default)]
struct Out {
    chunks: Vec<(u8, Vec<u8>)>,
}

impl Out {
    fn out(&mut self, data: impl AsRef<[u8]>) {
        self.chunks.push((1, data.as_ref().to_vec()));
    }

    fn err(&mut self, data: impl AsRef<[u8]>) {
        self.chunks.push((2, data.as_ref().to_vec()));
    }
}

/// An io error as coreutils word it (`No such file or directory`).
fn reason(e: &io::Error) -> String {
    io_message(e)
}

/// The interpreter state of one exec.
pub(crate) struct Interp<'a> {
    root: &'a Root,
    env: BTreeMap<String, String>,
    cwd: String,
    stdin: Option<Vec<u8>>,
    status: i32,
}

impl<'a> Interp<'a> {
    /// `cwd` is a normalized absolute sandbox path; `stdin` is what the
    /// first reader of stdin gets (then stdin is empty).
    pub fn new(
        root: &'a Root,
        env: BTreeMap<String, String>,
        cwd: String,
        stdin: Option<Vec<u8>>,
    ) -> Self {
        Interp {
            root,
            env,
            cwd,
            stdin,
            status: 0,
        }
    }

    /// Run an exec's argv; returns the exit code.
    pub async fn run_argv(&mut self, argv: &[String], sink: &mut Sink) -> i32 {
        if let Some(line) = shell_line(argv) {
            return match parse(line) {
                Ok(script) => self.run_script(&script, sink).await,
                Err(msg) => {
                    let text = format!(
                        "mock: syntax error: {msg} (the mock provider interprets only simple commands)\n"
                    );
                    sink.write(OutputStream::Stderr, text.as_bytes()).await;
                    SYNTAX_ERROR
                }
            };
        }
        let Some((name, args)) = argv.split_first() else {
            return 0;
        };
        let mut out = Out::default();
        let env = self.env.clone();
        let flow = self
            .command(name.clone(), args.to_vec(), env, None, &mut out)
            .await;
        let dests = [Dest::Stdout, Dest::Stdout, Dest::Stderr];
        self.route(out, &dests, &mut [], sink).await;
        match flow {
            Flow::Next(c) | Flow::Exit(c) => c,
        }
    }

    /// Run a parsed line; returns the exit code.
    pub async fn run_script(&mut self, script: &Script, sink: &mut Sink) -> i32 {
        for (conn, cmd) in &script.items {
            if sink.gone() {
                break;
            }
            match conn {
                Conn::And if self.status != 0 => continue,
                Conn::Or if self.status == 0 => continue,
                _ => {}
            }
            match self.simple(cmd, sink).await {
                Flow::Next(code) => self.status = code,
                Flow::Exit(code) => {
                    self.status = code;
                    return code;
                }
            }
        }
        self.status
    }

    /// Expand a word; `None` when an unquoted expansion came out empty
    /// (the word disappears, as in sh).
    fn expand(&self, w: &Word) -> Option<String> {
        let mut s = String::new();
        let mut keep = false;
        for p in &w.0 {
            match p {
                Part::Lit(t) => {
                    keep = true;
                    s.push_str(t);
                }
                Part::Quoted(t) => {
                    keep = true;
                    s.push_str(t);
                }
                Part::Var(name) => s.push_str(&self.var(name)),
            }
        }
        (keep || !s.is_empty()).then_some(s)
    }

    fn var(&self, name: &str) -> String {
        match name {
            "?" => self.status.to_string(),
            "PWD" => self
                .env
                .get("PWD")
                .cloned()
                .unwrap_or_else(|| self.cwd.clone()),
            n => self.env.get(n).cloned().unwrap_or_default(),
        }
    }

    /// `NAME=value` as the first part of a word: (name, expanded value).
    fn assignment(&self, w: &Word) -> Option<(String, String)> {
        let Some(Part::Lit(first)) = w.0.first() else {
            return None;
        };
        let (name, rest) = first.split_once('=')?;
        if !valid_name(name) {
            return None;
        }
        let tail = Word(w.0[1..].to_vec());
        let value = format!("{rest}{}", self.expand(&tail).unwrap_or_default());
        Some((name.to_string(), value))
    }

    /// The sandbox path of a command argument (relative to the working
    /// directory, `..` stopping at `/`).
    fn vpath(&self, arg: &str) -> String {
        let full = if arg.starts_with('/') {
            arg.to_string()
        } else {
            join(&self.cwd, arg)
        };
        let mut parts: Vec<&str> = Vec::new();
        for c in full.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                c => parts.push(c),
            }
        }
        format!("/{}", parts.join("/"))
    }

    /// The host path of a command argument, inside the root. The agent's
    /// own tree is off limits.
    fn host(&self, arg: &str, follow: bool) -> io::Result<std::path::PathBuf> {
        let v = self.vpath(arg);
        if stacyvm_agent_proto::path::is_reserved(&v) {
            return Err(io::Error::from_raw_os_error(EACCES));
        }
        self.root.resolve(&v, follow)
    }

    async fn simple(&mut self, cmd: &Command, sink: &mut Sink) -> Flow {
        let mut words = cmd.words.iter().peekable();
        let mut assigns = Vec::new();
        while let Some(w) = words.peek() {
            match self.assignment(w) {
                Some(a) => {
                    assigns.push(a);
                    words.next();
                }
                None => break,
            }
        }
        let argv: Vec<String> = words.filter_map(|w| self.expand(w)).collect();

        // Redirections, in order.
        let mut dests = [Dest::Stdout, Dest::Stdout, Dest::Stderr];
        let mut files: Vec<fs::File> = Vec::new();
        let mut stdin: Option<Vec<u8>> = None;
        for r in &cmd.redirs {
            let fd = usize::from(r.fd);
            let target = self.expand(&r.target).unwrap_or_default();
            let opened = match r.kind {
                RedirKind::Dup(to) => {
                    dests[fd] = dests[usize::from(to)];
                    continue;
                }
                RedirKind::Read if target == "/dev/null" => {
                    stdin = Some(Vec::new());
                    continue;
                }
                RedirKind::Read => self.host(&target, true).and_then(fs::read).map(|data| {
                    stdin = Some(data);
                }),
                _ if target == "/dev/null" => {
                    dests[fd] = Dest::Null;
                    continue;
                }
                RedirKind::Write | RedirKind::Append => self
                    .host(&target, true)
                    .and_then(|p| {
                        fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(r.kind == RedirKind::Write)
                            .append(r.kind == RedirKind::Append)
                            .open(p)
                    })
                    .map(|f| {
                        files.push(f);
                        dests[fd] = Dest::File(files.len() - 1);
                    }),
            };
            if let Err(e) = opened {
                let verb = if r.kind == RedirKind::Read {
                    "open"
                } else {
                    "create"
                };
                let msg = format!("mock: cannot {verb} {target}: {}\n", reason(&e));
                let mut out = Out::default();
                out.err(msg);
                self.route(out, &dests, &mut files, sink).await;
                return Flow::Next(2);
            }
        }

        if argv.is_empty() {
            self.env.extend(assigns);
            return Flow::Next(0);
        }
        let mut env = self.env.clone();
        env.extend(assigns);
        let mut out = Out::default();
        let mut it = argv.into_iter();
        let name = it.next().unwrap_or_default();
        let flow = self.command(name, it.collect(), env, stdin, &mut out).await;
        self.route(out, &dests, &mut files, sink).await;
        flow
    }

    /// Send a command's output where its file descriptors point.
    async fn route(&self, out: Out, dests: &[Dest; 3], files: &mut [fs::File], sink: &mut Sink) {
        for (fd, data) in out.chunks {
            match dests[usize::from(fd)] {
                Dest::Stdout => sink.write(OutputStream::Stdout, &data).await,
                Dest::Stderr => sink.write(OutputStream::Stderr, &data).await,
                Dest::Null => {}
                Dest::File(i) => {
                    if let Some(f) = files.get_mut(i) {
                        if let Err(e) = f.write_all(&data) {
                            let msg = format!("mock: write error: {}\n", reason(&e));
                            sink.write(OutputStream::Stderr, msg.as_bytes()).await;
                        }
                    }
                }
            }
        }
    }

    /// Run one command by name.
    async fn command(
        &mut self,
        mut name: String,
        mut args: Vec<String>,
        mut env: BTreeMap<String, String>,
        stdin: Option<Vec<u8>>,
        out: &mut Out,
    ) -> Flow {
        // `env NAME=VALUE… COMMAND…` runs COMMAND with that environment.
        if base(&name) == "env" && !args.is_empty() {
            let mut rest = args.into_iter().peekable();
            while let Some(a) = rest.peek() {
                match a.split_once('=') {
                    Some((k, v)) if !k.is_empty() => {
                        env.insert(k.to_string(), v.to_string());
                        rest.next();
                    }
                    _ => break,
                }
            }
            match rest.next() {
                Some(cmd) => {
                    name = cmd;
                    args = rest.collect();
                }
                None => {
                    print_env(&env, out);
                    return Flow::Next(0);
                }
            }
        }
        let code = match base(&name) {
            ":" | "true" => 0,
            "false" => 1,
            "exit" => return self.exit(&args, out),
            "echo" => echo(&args, out),
            "pwd" => {
                out.out(format!("{}\n", self.cwd));
                0
            }
            "cd" => self.cd(&args, &env, out),
            "env" => {
                print_env(&env, out);
                0
            }
            "printenv" => printenv(&args, &env, out),
            "export" => self.export(&args, out),
            "cat" => self.cat(&args, stdin, out),
            "ls" => self.ls(&args, out),
            "mkdir" => self.mkdir(&args, out),
            "touch" => self.touch(&args, out),
            "rm" => self.rm(&args, out),
            "sleep" => match sleep_duration(&args) {
                Ok(d) => {
                    tokio::time::sleep(d).await;
                    0
                }
                Err(msg) => {
                    out.err(format!("sleep: {msg}\n"));
                    1
                }
            },
            _ => {
                out.err(not_found_message(&name));
                NOT_FOUND
            }
        };
        Flow::Next(code)
    }

    fn exit(&self, args: &[String], out: &mut Out) -> Flow {
        match args.first() {
            None => Flow::Exit(self.status),
            Some(a) => match a.parse::<i64>() {
                Ok(n) => Flow::Exit((n & 0xFF) as i32),
                Err(_) => {
                    out.err(format!("exit: Illegal number: {a}\n"));
                    Flow::Exit(2)
                }
            },
        }
    }

    fn cd(&mut self, args: &[String], env: &BTreeMap<String, String>, out: &mut Out) -> i32 {
        let target = match args.first() {
            Some(a) => a.clone(),
            None => env.get("HOME").cloned().unwrap_or_else(|| "/".to_string()),
        };
        let v = self.vpath(&target);
        match self.host(&target, true).and_then(fs::metadata) {
            Ok(m) if m.is_dir() => {
                self.cwd = v;
                0
            }
            Ok(_) => {
                out.err(format!("cd: {target}: Not a directory\n"));
                1
            }
            Err(e) => {
                out.err(format!("cd: {target}: {}\n", reason(&e)));
                1
            }
        }
    }

    fn export(&mut self, args: &[String], out: &mut Out) -> i32 {
        let mut code = 0;
        for a in args {
            let (name, value) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (a.as_str(), None),
            };
            if !valid_name(name) {
                out.err(format!("export: `{a}': not a valid identifier\n"));
                code = 1;
                continue;
            }
            if let Some(v) = value {
                self.env.insert(name.to_string(), v.to_string());
            }
        }
        code
    }

    fn cat(&mut self, args: &[String], stdin: Option<Vec<u8>>, out: &mut Out) -> i32 {
        let mut stdin = stdin;
        let mut read_stdin = |me: &mut Self| stdin.take().or_else(|| me.stdin.take());
        if args.is_empty() {
            if let Some(data) = read_stdin(self) {
                out.out(data);
            }
            return 0;
        }
        let mut code = 0;
        for a in args {
            if a == "-" {
                if let Some(data) = read_stdin(self) {
                    out.out(data);
                }
                continue;
            }
            match self.host(a, true).and_then(|p| {
                let m = fs::metadata(&p)?;
                if m.is_dir() {
                    Err(io::Error::from_raw_os_error(EISDIR))
                } else if !m.is_file() {
                    Err(io::Error::other("Not a regular file"))
                } else {
                    fs::read(p)
                }
            }) {
                Ok(data) => out.out(data),
                Err(e) => {
                    out.err(format!("cat: {a}: {}\n", reason(&e)));
                    code = 1;
                }
            }
        }
        code
    }

    fn ls(&self, args: &[String], out: &mut Out) -> i32 {
        let (flags, mut paths) = split_options(args);
        let (mut all, mut almost) = (false, false);
        for f in flags {
            match f {
                'a' => all = true,
                'A' => almost = true,
                '1' => {}
                other => {
                    out.err(format!(
                        "ls: invalid option -- '{other}' (the mock's ls knows -a, -A, -1)\n"
                    ));
                    return 2;
                }
            }
        }
        if paths.is_empty() {
            paths.push(".");
        }
        let many = paths.len() > 1;
        let mut code = 0;
        let mut first = true;
        for p in &paths {
            let listing = self.host(p, true).and_then(|h| {
                let m = fs::metadata(&h)?;
                if !m.is_dir() {
                    return Ok(None);
                }
                let mut names: Vec<String> = fs::read_dir(&h)?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| all || almost || !n.starts_with('.'))
                    .collect();
                if all {
                    names.push(".".into());
                    names.push("..".into());
                }
                names.sort();
                Ok(Some(names))
            });
            match listing {
                Ok(None) => out.out(format!("{p}\n")),
                Ok(Some(names)) => {
                    let mut text = String::new();
                    if many {
                        if !first {
                            text.push('\n');
                        }
                        text.push_str(&format!("{p}:\n"));
                    }
                    for n in names {
                        text.push_str(&n);
                        text.push('\n');
                    }
                    out.out(text);
                }
                Err(e) => {
                    out.err(format!("ls: cannot access '{p}': {}\n", reason(&e)));
                    code = 2;
                }
            }
            first = false;
        }
        code
    }

    fn mkdir(&self, args: &[String], out: &mut Out) -> i32 {
        let parents = args.iter().any(|a| a == "-p");
        let dirs: Vec<&String> = args.iter().filter(|a| *a != "-p").collect();
        if dirs.is_empty() {
            out.err("mkdir: missing operand\n");
            return 1;
        }
        let mut code = 0;
        for d in dirs {
            let res = if parents {
                self.host(d, true).and_then(|h| {
                    if h.exists() && !h.is_dir() {
                        return Err(io::Error::from_raw_os_error(EEXIST));
                    }
                    self.root.create_dirs(&self.vpath(d))
                })
            } else {
                self.host(d, false).and_then(fs::create_dir)
            };
            if let Err(e) = res {
                out.err(format!(
                    "mkdir: cannot create directory '{d}': {}\n",
                    reason(&e)
                ));
                code = 1;
            }
        }
        code
    }

    fn touch(&self, args: &[String], out: &mut Out) -> i32 {
        if args.is_empty() {
            out.err("touch: missing file operand\n");
            return 1;
        }
        let mut code = 0;
        for a in args {
            let res = self.host(a, true).and_then(|h| {
                let f = fs::OpenOptions::new().create(true).append(true).open(h)?;
                f.set_modified(SystemTime::now())
            });
            if let Err(e) = res {
                out.err(format!("touch: cannot touch '{a}': {}\n", reason(&e)));
                code = 1;
            }
        }
        code
    }

    fn rm(&self, args: &[String], out: &mut Out) -> i32 {
        let (flags, paths) = split_options(args);
        let (mut recursive, mut force) = (false, false);
        for f in flags {
            match f {
                'r' | 'R' => recursive = true,
                'f' => force = true,
                other => {
                    out.err(format!("rm: invalid option -- '{other}'\n"));
                    return 1;
                }
            }
        }
        if paths.is_empty() && !force {
            out.err("rm: missing operand\n");
            return 1;
        }
        let mut code = 0;
        for p in paths {
            if self.vpath(p) == "/" {
                out.err("rm: it is dangerous to operate recursively on '/'\n");
                code = 1;
                continue;
            }
            let res = self.host(p, false).and_then(|h| {
                let m = fs::symlink_metadata(&h)?;
                if !m.is_dir() {
                    fs::remove_file(h)
                } else if recursive {
                    fs::remove_dir_all(h)
                } else {
                    Err(io::Error::from_raw_os_error(EISDIR))
                }
            });
            match res {
                Ok(()) => {}
                Err(e) if force && e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    out.err(format!("rm: cannot remove '{p}': {}\n", reason(&e)));
                    code = 1;
                }
            }
        }
        code
    }
}

/// A command's arguments split into its option letters (of `-abc` words)
/// and its operands, each in order.
fn split_options(args: &[String]) -> (Vec<char>, Vec<&str>) {
    let mut flags = Vec::new();
    let mut operands = Vec::new();
    for a in args {
        match a.strip_prefix('-') {
            Some(f) if !f.is_empty() => flags.extend(f.chars()),
            _ => operands.push(a.as_str()),
        }
    }
    (flags, operands)
}

/// The command a name or path such as `/bin/echo` stands for.
fn base(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn echo(args: &[String], out: &mut Out) -> i32 {
    let mut newline = true;
    let mut rest = args;
    while let Some((first, tail)) = rest.split_first() {
        if first != "-n" {
            break;
        }
        newline = false;
        rest = tail;
    }
    let mut text = rest.join(" ");
    if newline {
        text.push('\n');
    }
    out.out(text);
    0
}

fn print_env(env: &BTreeMap<String, String>, out: &mut Out) {
    let mut text = String::new();
    for (k, v) in env {
        text.push_str(&format!("{k}={v}\n"));
    }
    out.out(text);
}

fn printenv(args: &[String], env: &BTreeMap<String, String>, out: &mut Out) -> i32 {
    if args.is_empty() {
        print_env(env, out);
        return 0;
    }
    let mut code = 0;
    for a in args {
        match env.get(a) {
            Some(v) => out.out(format!("{v}\n")),
            None => code = 1,
        }
    }
    code
}

/// The total of `sleep`'s operands (`1`, `0.5`, `2s`, `1m`, `1h`, `1d`).
fn sleep_duration(args: &[String]) -> Result<Duration, String> {
    if args.is_empty() {
        return Err("missing operand".into());
    }
    let mut total = Duration::ZERO;
    for a in args {
        let (num, unit) = match a.char_indices().last() {
            Some((i, c @ ('s' | 'm' | 'h' | 'd'))) => (&a[..i], c),
            _ => (a.as_str(), 's'),
        };
        let factor = match unit {
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86_400.0,
            _ => 1.0,
        };
        let invalid = || format!("invalid time interval '{a}'");
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(invalid());
        }
        let secs: f64 = num.parse().map_err(|_| invalid())?;
        let d = Duration::try_from_secs_f64(secs * factor).map_err(|_| invalid())?;
        total = total.checked_add(d).ok_or_else(invalid)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::fs::tests::TempDir;

    struct Run {
        code: i32,
        stdout: String,
        stderr: String,
    }

    async fn sh_in(root: &Root, line: &str, stdin: Option<&str>) -> Run {
        argv_in(root, &["/bin/sh", "-c", line], stdin).await
    }

    async fn argv_in(root: &Root, argv: &[&str], stdin: Option<&str>) -> Run {
        let env = BTreeMap::from([
            ("HOME".to_string(), "/root".to_string()),
            ("GREETING".to_string(), "hello".to_string()),
        ]);
        let mut interp = Interp::new(
            root,
            env,
            "/w".to_string(),
            stdin.map(|s| s.as_bytes().to_vec()),
        );
        let mut sink = Sink::collect(1 << 20);
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let code = interp.run_argv(&argv, &mut sink).await;
        Run {
            code,
            stdout: sink.text(OutputStream::Stdout),
            stderr: sink.text(OutputStream::Stderr),
        }
    }

    fn fixture(tag: &str) -> (TempDir, Root) {
        let t = TempDir::new(tag);
        fs::create_dir_all(t.0.join("root/w")).unwrap();
        fs::create_dir_all(t.0.join("root/root")).unwrap();
        let root = Root::new(t.0.join("root"));
        (t, root)
    }

    #[test]
    fn parses_words_quotes_and_operators() {
        let s = parse("echo 'a b' \"c $X\" d\\ e; false && x || y # comment").unwrap();
        assert_eq!(s.items.len(), 4);
        assert_eq!(s.items[0].1.words.len(), 4);
        assert_eq!(
            s.items[0].1.words[2],
            Word(vec![Part::Quoted("c ".into()), Part::Var("X".into())])
        );
        assert_eq!(s.items[1].0, Conn::Seq);
        assert_eq!(s.items[2].0, Conn::And);
        assert_eq!(s.items[3].0, Conn::Or);
        let s = parse("echo x >out 2>&1 >>log <in").unwrap();
        let kinds: Vec<_> = s.items[0].1.redirs.iter().map(|r| (r.fd, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (1, RedirKind::Write),
                (2, RedirKind::Dup(1)),
                (1, RedirKind::Append),
                (0, RedirKind::Read)
            ]
        );
        assert_eq!(parse("").unwrap(), Script::default());
        assert_eq!(parse("\n\n  ;").unwrap(), Script::default());
        for bad in [
            "echo a | cat",
            "sleep 1 &",
            "echo $(id)",
            "echo `id`",
            "(echo a)",
            "echo 'open",
            "echo \"open",
            "&& echo",
            "echo a &&",
            "echo >",
            "cat <<EOF",
            "echo ${A:-x}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn basics_and_exit_codes() {
        let (_t, root) = fixture("basics");
        let r = sh_in(&root, "echo hi", None).await;
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (0, "hi\n", "")
        );
        assert_eq!(sh_in(&root, "true", None).await.code, 0);
        assert_eq!(sh_in(&root, "false", None).await.code, 1);
        assert_eq!(sh_in(&root, "exit 3", None).await.code, 3);
        assert_eq!(sh_in(&root, "exit 257", None).await.code, 1);
        let r = sh_in(&root, "echo before; exit 4; echo after", None).await;
        assert_eq!((r.code, r.stdout.as_str()), (4, "before\n"));
        let r = sh_in(&root, "echo before; false", None).await;
        assert_eq!((r.code, r.stdout.as_str()), (1, "before\n"));
        let r = sh_in(&root, "false && echo no || echo yes; echo $?", None).await;
        assert_eq!(r.stdout, "yes\n0\n");
        let r = sh_in(&root, "false; echo $?", None).await;
        assert_eq!(r.stdout, "1\n");
        let r = sh_in(&root, "echo -n a; echo b c", None).await;
        assert_eq!(r.stdout, "ab c\n");
        let r = sh_in(&root, "echo to-out; echo to-err >&2; exit 3", None).await;
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (3, "to-out\n", "to-err\n")
        );
    }

    #[tokio::test]
    async fn unknown_commands_and_syntax() {
        let (_t, root) = fixture("unknown");
        let r = sh_in(&root, "python3 -c 'print(1)'", None).await;
        assert_eq!(r.code, 127);
        assert_eq!(r.stderr, not_found_message("python3"));
        assert!(r.stderr.contains("mock: python3: command not found"));
        let r = argv_in(&root, &["node", "x.js"], None).await;
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (127, not_found_message("node").as_str())
        );
        let r = sh_in(&root, "nope 2>/dev/null; echo $?", None).await;
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("127\n", ""));
        let r = sh_in(&root, "echo a | cat", None).await;
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.starts_with("mock: syntax error: pipes"),
            "{}",
            r.stderr
        );
    }

    #[tokio::test]
    async fn argv_mode_does_not_expand() {
        let (_t, root) = fixture("argv");
        let r = argv_in(&root, &["echo", "$HOME", ";", "ls", "*"], None).await;
        assert_eq!(r.stdout, "$HOME ; ls *\n");
        let r = argv_in(&root, &["/bin/echo", "x"], None).await;
        assert_eq!(r.stdout, "x\n");
        let r = argv_in(&root, &["sh", "-c", "echo $GREETING"], None).await;
        assert_eq!(r.stdout, "hello\n");
        let r = argv_in(&root, &["sh", "script.sh"], None).await;
        assert_eq!(r.code, 127);
    }

    #[tokio::test]
    async fn environment_and_variables() {
        let (_t, root) = fixture("env");
        let r = sh_in(
            &root,
            "echo $GREETING ${GREETING}x \"$GREETING\" '$GREETING' $NOPE.",
            None,
        )
        .await;
        assert_eq!(r.stdout, "hello hellox hello $GREETING .\n");
        let r = sh_in(&root, "A=1; echo $A; B=2 printenv B; echo \"[$B]\"", None).await;
        assert_eq!(r.stdout, "1\n2\n[]\n");
        let r = sh_in(&root, "export K=v; env", None).await;
        assert_eq!(r.stdout, "GREETING=hello\nHOME=/root\nK=v\n");
        let r = sh_in(&root, "env X=1 printenv X GREETING", None).await;
        assert_eq!(r.stdout, "1\nhello\n");
        assert_eq!(sh_in(&root, "printenv NOPE", None).await.code, 1);
        let r = sh_in(&root, "echo ~ ~/x", None).await;
        assert_eq!(r.stdout, "/root /root/x\n");
    }

    #[tokio::test]
    async fn files_and_directories() {
        let (t, root) = fixture("files");
        let r = sh_in(
            &root,
            "pwd; mkdir -p a/b && cd a/b && pwd && echo x > f && cat f",
            None,
        )
        .await;
        assert_eq!((r.code, r.stdout.as_str()), (0, "/w\n/w/a/b\nx\n"));
        assert_eq!(fs::read(t.0.join("root/w/a/b/f")).unwrap(), b"x\n");
        let r = sh_in(&root, "echo one > /w/g; echo two >> /w/g; cat /w/g", None).await;
        assert_eq!(r.stdout, "one\ntwo\n");
        let r = sh_in(&root, "touch z; ls; ls -a /w/a", None).await;
        assert_eq!(r.stdout, "a\ng\nz\n.\n..\nb\n");
        let r = sh_in(&root, "cat missing; echo $?", None).await;
        assert_eq!(r.stdout, "1\n");
        assert_eq!(r.stderr, "cat: missing: No such file or directory\n");
        let r = sh_in(&root, "ls nope", None).await;
        assert_eq!(r.code, 2);
        assert_eq!(
            r.stderr,
            "ls: cannot access 'nope': No such file or directory\n"
        );
        let r = sh_in(&root, "mkdir a", None).await;
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (1, "mkdir: cannot create directory 'a': File exists\n")
        );
        let r = sh_in(&root, "rm a; rm -r a && ls", None).await;
        assert_eq!(r.stderr, "rm: cannot remove 'a': Is a directory\n");
        assert_eq!(r.stdout, "g\nz\n");
        assert_eq!(sh_in(&root, "rm -f nope", None).await.code, 0);
        let r = sh_in(&root, "cd /nope", None).await;
        assert_eq!(
            (r.code, r.stderr.as_str()),
            (1, "cd: /nope: No such file or directory\n")
        );
        let r = sh_in(&root, "echo x > /nope/f", None).await;
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.starts_with("mock: cannot create /nope/f"),
            "{}",
            r.stderr
        );
        let r = sh_in(&root, "cat < g", None).await;
        assert_eq!(r.stdout, "one\ntwo\n");
        let r = sh_in(&root, "ls /.stacyvm", None).await;
        assert_eq!(r.code, 2);
    }

    #[tokio::test]
    async fn stdin_is_read_once() {
        let (_t, root) = fixture("stdin");
        let r = sh_in(&root, "cat; echo done; cat", Some("hello\nworld\n")).await;
        assert_eq!(r.stdout, "hello\nworld\ndone\n");
        let r = argv_in(&root, &["cat"], Some("raw")).await;
        assert_eq!(r.stdout, "raw");
        let r = sh_in(&root, "cat", None).await;
        assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    }

    #[tokio::test]
    async fn paths_stay_inside_the_root() {
        let (t, root) = fixture("confine");
        fs::write(t.0.join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink(t.0.join("secret"), t.0.join("root/w/link")).unwrap();
        std::os::unix::fs::symlink("../../secret", t.0.join("root/w/up")).unwrap();
        for line in ["cat ../../secret", "cat /../secret", "cat link", "cat up"] {
            let r = sh_in(&root, line, None).await;
            assert_eq!(r.code, 1, "{line}: {}", r.stdout);
            assert!(!r.stdout.contains("host"), "{line}");
        }
        let r = sh_in(&root, "echo pwned > link; echo pwned > ../../../x", None).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(fs::read(t.0.join("secret")).unwrap(), b"host");
        assert!(!t.0.join("x").exists());
        assert!(t.0.join("root/x").exists());
        let r = sh_in(&root, "cd ../../..; pwd; ls", None).await;
        assert_eq!(r.stdout, "/\nroot\nw\nx\n");
    }

    #[tokio::test]
    async fn sleep_sleeps() {
        let (_t, root) = fixture("sleep");
        let t0 = std::time::Instant::now();
        let r = sh_in(&root, "sleep 0.2 && echo woke", None).await;
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(r.stdout, "woke\n");
        let r = sh_in(&root, "sleep; sleep abc", None).await;
        assert_eq!(
            r.stderr,
            "sleep: missing operand\nsleep: invalid time interval 'abc'\n"
        );
        assert_eq!(
            sleep_duration(&["1m".into(), "0.5".into()]),
            Ok(Duration::from_millis(60_500))
        );
        assert!(sleep_duration(&["-1".into()]).is_err());
        assert!(sleep_duration(&["inf".into()]).is_err());
    }
}
