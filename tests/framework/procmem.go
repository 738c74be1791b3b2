package framework

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// MemRegion is one mapping of a process, a line of /proc/<pid>/maps.
type MemRegion struct {
	Start, End uint64
	// Perms are the mapping's permissions, e.g. "rw-p".
	Perms string
	// Path is the mapped file, a pseudo-name such as "[heap]" or
	// "[stack]", or "" for anonymous memory (where Go keeps its heap).
	Path string
}

func (r MemRegion) String() string {
	name := r.Path
	if name == "" {
		name = "anonymous"
	}
	return fmt.Sprintf("%x-%x %s %s", r.Start, r.End, r.Perms, name)
}

// Readable reports whether the mapping may be read.
func (r MemRegion) Readable() bool { return strings.HasPrefix(r.Perms, "r") }

// kernelRegions are mappings the kernel provides that hold no data of the
// process and that /proc/<pid>/mem does not read ([vsyscall] lies above
// every offset a file read can reach).
var kernelRegions = map[string]bool{"[vvar]": true, "[vvar_vclock]": true, "[vsyscall]": true}

// ReadMaps parses /proc/<pid>/maps.
func ReadMaps(pid int) ([]MemRegion, error) {
	path := fmt.Sprintf("/proc/%d/maps", pid)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("framework: %w", err)
	}
	var out []MemRegion
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// address perms offset dev inode [path], the path possibly with
		// spaces in it.
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			return nil, fmt.Errorf("framework: %s: malformed line %q", path, sc.Text())
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if !ok || err1 != nil || err2 != nil || end < start {
			return nil, fmt.Errorf("framework: %s: malformed address range %q", path, f[0])
		}
		out = append(out, MemRegion{Start: start, End: end, Perms: f[1], Path: strings.Join(f[5:], " ")})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("framework: %s lists no mapping", path)
	}
	return out, nil
}

// MemFinding is a secret found in a process's memory.
type MemFinding struct {
	Secret, Encoding string
	// Addr is the virtual address of the first byte of the match.
	Addr   uint64
	Region MemRegion
}

func (f MemFinding) String() string {
	return fmt.Sprintf("%s (%s) at %#x in %s", f.Secret, f.Encoding, f.Addr, f.Region)
}

// MemStats says how much of a process a memory scan read.
type MemStats struct {
	// Regions is how many mappings the process had; Read how many of them
	// were read whole; Skipped those that are not readable (guard pages,
	// Go's reserved address space) or the kernel's own.
	Regions, Read, Skipped int
	// Bytes is how many bytes were read.
	Bytes int64
	// Hits counts every match, also those beyond the findings listed.
	Hits int
}

// maxMemFindings bounds the findings a scan returns: a key copied all over
// the heap is reported, not listed a million times.
const maxMemFindings = 200

// memChunk is how much of a mapping is read at once.
const memChunk = 1 << 20

// ScanProcessMemory reads every readable mapping of process pid through
// /proc/<pid>/mem and reports each place where any of the secrets appears,
// in any of its Encodings. Reading another process's memory takes the right
// to ptrace it: the same user and a dumpable process, or root with
// CAP_SYS_PTRACE for a process that made itself non-dumpable (Cairn's
// servers do, see lockedmem.HardenProcess); ProcMemAccess tells which.
//
// Stop the process (SIGSTOP) during the scan: a running one may change
// its mappings between the read of maps and the read of the memory, which
// makes the scan fail. A readable mapping that cannot be read is an error,
// never a silent gap.
func ScanProcessMemory(pid int, secrets []Secret) ([]MemFinding, MemStats, error) {
	m, err := newMemMatcher(secrets)
	if err != nil {
		return nil, MemStats{}, err
	}
	regions, err := ReadMaps(pid)
	if err != nil {
		return nil, MemStats{}, err
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return nil, MemStats{}, fmt.Errorf("framework: %w", err)
	}
	defer f.Close()
	stats := MemStats{Regions: len(regions)}
	var found []MemFinding
	buf := make([]byte, memChunk+m.maxLen-1)
	defer clear(buf)
	for _, r := range regions {
		if !r.Readable() || kernelRegions[r.Path] {
			stats.Skipped++
			continue
		}
		if err := m.scanRegion(f, r, buf, &found, &stats); err != nil {
			return found, stats, fmt.Errorf("framework: pid %d: %w", pid, err)
		}
		stats.Read++
	}
	return found, stats, nil
}

// scanRegion reads mapping r from mem (at offsets equal to addresses) in
// chunks of len(buf) less the overlap, and adds what it finds.
func (m *memMatcher) scanRegion(mem io.ReaderAt, r MemRegion, buf []byte, found *[]MemFinding, stats *MemStats) error {
	// A match may straddle two chunks: each chunk after the first starts
	// with the last overlap bytes of the one before.
	overlap := m.maxLen - 1
	chunk := uint64(len(buf) - overlap)
	carried := 0
	for addr := r.Start; addr < r.End; {
		n := min(chunk, r.End-addr)
		if addr > uint64(1<<63-1)-n {
			return fmt.Errorf("mapping %s lies beyond what /proc/<pid>/mem can read", r)
		}
		got, err := mem.ReadAt(buf[carried:carried+int(n)], int64(addr))
		if got != int(n) {
			return fmt.Errorf("reading %d bytes at %#x of mapping %s: read %d: %v", n, addr, r, got, err)
		}
		stats.Bytes += int64(n)
		data := buf[:carried+int(n)]
		base := addr - uint64(carried)
		for _, hit := range m.find(data) {
			p := m.patterns[hit.pattern]
			if hit.offset+len(p.enc.Bytes) <= carried {
				continue // wholly in the carried bytes: found in the chunk before
			}
			stats.Hits++
			if len(*found) < maxMemFindings {
				*found = append(*found, MemFinding{Secret: p.secret, Encoding: p.enc.Name, Addr: base + uint64(hit.offset), Region: r})
			}
		}
		addr += n
		carried = min(overlap, len(data))
		copy(buf, data[len(data)-carried:])
	}
	return nil
}

// memMatcher finds many patterns in memory in one pass, looking at every
// eighth byte only. Each occurrence of a pattern (at least minSecretLen
// bytes long) covers exactly one offset p that is a multiple of 8 and lies
// within its first 8 bytes (at j = 0..7 into it), and the 8 bytes from p
// are still inside it. So the 8-byte words of every pattern at j = 0..7
// are indexed, the data is read a word at a time, most words are rejected
// by a bit filter, and the few candidates are compared in full. Every
// occurrence is found once; a scan reads hundreds of megabytes in seconds,
// even in a test binary built with -race.
type memMatcher struct {
	patterns []pattern
	words    map[uint64][]wordRef
	filter   []uint64 // a bit per hash of an indexed word
	maxLen   int
}

// wordRef is the word of pattern at offset at of it.
type wordRef struct{ pattern, at int }

// filterBits is log2 of the filter's size in bits.
const filterBits = 20

func wordHash(w uint64) uint64 { return (w * 0x9E3779B97F4A7C15) >> (64 - filterBits) }

func newMemMatcher(secrets []Secret) (*memMatcher, error) {
	if len(secrets) == 0 {
		return nil, errors.New("framework: no secrets to scan memory for")
	}
	m := &memMatcher{words: map[uint64][]wordRef{}, filter: make([]uint64, 1<<filterBits/64)}
	for _, s := range secrets {
		if len(s.Value) < minSecretLen {
			return nil, fmt.Errorf("framework: secret %s is %d bytes; too short to scan for without false hits", s.Name, len(s.Value))
		}
		for _, e := range Encodings(s.Value) {
			if len(e.Bytes) < minSecretLen {
				return nil, fmt.Errorf("framework: secret %s: encoding %s is %d bytes, shorter than %d", s.Name, e.Name, len(e.Bytes), minSecretLen)
			}
			id := len(m.patterns)
			m.patterns = append(m.patterns, pattern{secret: s.Name, enc: e})
			for j := range 8 {
				w := binary.LittleEndian.Uint64(e.Bytes[j:])
				m.words[w] = append(m.words[w], wordRef{pattern: id, at: j})
				h := wordHash(w)
				m.filter[h/64] |= 1 << (h % 64)
			}
			m.maxLen = max(m.maxLen, len(e.Bytes))
		}
	}
	return m, nil
}

// memHit is pattern found at offset.
type memHit struct{ pattern, offset int }

// zeroPage is a page of zeros: most of a process's mapped memory is, and
// such a page is skipped with one comparison.
var zeroPage = make([]byte, 4096)

// find returns every occurrence of every pattern that lies wholly in data,
// each once.
func (m *memMatcher) find(data []byte) []memHit {
	var out []memHit
	// A zero word can be skipped unless some pattern's indexed word is
	// zero (a secret with eight zero bytes near its start).
	_, zeroIndexed := m.words[0]
	for p := 0; p+8 <= len(data); p += 8 {
		if !zeroIndexed && p%len(zeroPage) == 0 && p+len(zeroPage) <= len(data) && bytes.Equal(data[p:p+len(zeroPage)], zeroPage) {
			p += len(zeroPage) - 8
			continue
		}
		w := binary.LittleEndian.Uint64(data[p:])
		h := wordHash(w)
		if m.filter[h/64]&(1<<(h%64)) == 0 {
			continue
		}
		for _, ref := range m.words[w] {
			pat := m.patterns[ref.pattern].enc.Bytes
			start := p - ref.at
			if start >= 0 && start+len(pat) <= len(data) && bytes.Equal(data[start:start+len(pat)], pat) {
				out = append(out, memHit{pattern: ref.pattern, offset: start})
			}
		}
	}
	return out
}

// capSysPtrace is CAP_SYS_PTRACE's bit in /proc/<pid>/status CapEff.
const capSysPtrace = 19

// ProcMemAccess reports why this process may not be able to read the
// memory of a process that made itself non-dumpable (as Cairn's servers
// do), or nil if it may: that takes root with CAP_SYS_PTRACE.
func ProcMemAccess() error {
	if euid := os.Geteuid(); euid != 0 {
		return fmt.Errorf("not root (euid %d): reading a non-dumpable process's /proc/<pid>/mem takes root with CAP_SYS_PTRACE", euid)
	}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return fmt.Errorf("cannot read this process's capabilities: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		v, ok := strings.CutPrefix(line, "CapEff:")
		if !ok {
			continue
		}
		caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return fmt.Errorf("malformed CapEff line %q in /proc/self/status", strings.TrimSpace(line))
		}
		if caps&(1<<capSysPtrace) == 0 {
			return fmt.Errorf("root without CAP_SYS_PTRACE (CapEff %016x): a non-dumpable process's memory cannot be read", caps)
		}
		return nil
	}
	return errors.New("no CapEff line in /proc/self/status")
}

// limitNameWidth is the width of the name column of /proc/<pid>/limits.
const limitNameWidth = 25

// ProcessLimit returns the soft and hard values of one limit of process pid
// as /proc/<pid>/limits shows them ("0", "unlimited"), named as there, e.g.
// "Max core file size".
func ProcessLimit(pid int, name string) (soft, hard string, err error) {
	path := fmt.Sprintf("/proc/%d/limits", pid)
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("framework: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		// The kernel prints the name left-aligned in 25 columns, then a
		// space (fs/proc/base.c).
		if len(line) <= limitNameWidth || strings.TrimRight(line[:limitNameWidth], " ") != name {
			continue
		}
		f := strings.Fields(line[limitNameWidth:])
		if len(f) < 2 {
			return "", "", fmt.Errorf("framework: %s: malformed line %q", path, strings.TrimSpace(line))
		}
		return f[0], f[1], nil
	}
	return "", "", fmt.Errorf("framework: %s has no %q line", path, name)
}

// WaitStopped waits until process pid is stopped (SIGSTOP: state T in
// /proc/<pid>/task/<tid>/stat for every one of its threads), polling for at
// most WaitTimeout. A signal is delivered asynchronously, and each thread of
// the group stops only when it next handles it: until the last one has, the
// process can still run (answer a Raft heartbeat, write to its log), and a
// test that counts on it being still (a memory scan, a leader cut off from
// its quorum) must wait.
func WaitStopped(pid int) error {
	deadline := time.Now().Add(WaitTimeout)
	for {
		running, err := runningThreads(pid)
		if err != nil {
			return err
		}
		if running == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("framework: pid %d not stopped after %s: %s", pid, WaitTimeout, running)
		}
		time.Sleep(time.Millisecond)
	}
}

// runningThreads names the threads of pid that are not stopped ("" if
// none).
func runningThreads(pid int) (string, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("framework: %w", err)
	}
	var running []string
	for _, task := range tasks {
		path := filepath.Join(dir, task.Name(), "stat")
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // the thread exited
		}
		if err != nil {
			return "", fmt.Errorf("framework: %w", err)
		}
		// pid (comm) state ...: comm may hold spaces and parentheses, so
		// the state follows the last ")".
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) {
			return "", fmt.Errorf("framework: %s: malformed %q", path, b)
		}
		if state := b[i+2]; state != 'T' && state != 't' {
			running = append(running, fmt.Sprintf("thread %s in state %c", task.Name(), state))
		}
	}
	return strings.Join(running, ", "), nil
}
