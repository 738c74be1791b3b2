package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"
)

var (
	// ErrClosed is returned by [Log.Write] and [Log.Close] after the log
	// has been closed.
	ErrClosed = errors.New("audit: log closed")
	// ErrBroken is returned, wrapped together with the original cause, by
	// every [Log.Write] once a record may have been lost or mangled and the
	// sink could not be repaired. The log stays broken until it is closed
	// and reopened.
	ErrBroken = errors.New("audit: log broken")
)

// Options configures a [Log]. The zero value is valid.
type Options struct {
	// Sync makes every Write flush the record to stable storage (fsync)
	// before it returns. For a sink given to NewWriter, Sync calls the
	// sink's Sync method if it has one.
	Sync bool
	// Now is the clock for records whose Time is zero. Nil means time.Now.
	Now func() time.Time
	// Signer signs checkpoints: it returns the server's private key and its
	// certificate chain, leaf first (an X.509-SVID; see [SVIDSigner]). It is
	// called for every checkpoint, so a reloaded certificate is used from
	// the next one. Nil means no checkpoints: the records are still
	// chained, but nothing signs the chain head.
	Signer func() (crypto.Signer, []*x509.Certificate, error)
	// CheckpointEvery is how many records, at most, are written between two
	// checkpoints (0: DefaultCheckpointEvery; negative: no count limit).
	CheckpointEvery int
	// CheckpointInterval is how often a checkpoint is written if records
	// were written since the last one (0: DefaultCheckpointInterval;
	// negative: never by time). The same timer notices that the log file
	// was renamed or removed (rotated by an operator) and reopens the path,
	// as [Log.Reopen] does.
	CheckpointInterval time.Duration
}

// Defaults of Options.
const (
	// DefaultCheckpointEvery bounds the records a checkpoint covers: at
	// most that many records can be cut from the end of a live log without
	// a signed head saying they existed.
	DefaultCheckpointEvery = 1000
	// DefaultCheckpointInterval bounds how long records stay unsigned on a
	// quiet log.
	DefaultCheckpointInterval = time.Minute
)

// Log is an append-only audit log. It is safe for concurrent use; records
// are written one at a time, each with a single write call to the sink, so
// lines never interleave.
//
// A Log must be made with [Open] or [NewWriter].
type Log struct {
	sync     bool
	now      func() time.Time
	signer   func() (crypto.Signer, []*x509.Certificate, error)
	every    int
	interval time.Duration
	path     string // the file's path for an Open log, "" for NewWriter

	// head is the SHA-256 of the last line in the sink (zero: none, the
	// next record starts a chain), and since the records written after
	// the last checkpoint. Only the flusher changes them, under mu, after
	// a batch is in the sink; it reads them without mu while it flushes.
	head  [sha256.Size]byte
	since uint64
	// out is the flusher's buffer: a batch with its chain links filled in.
	out []byte
	// queued counts records queued since the last queued checkpoint (mu).
	queued int
	// stop ends the checkpoint timer; done is closed when it has.
	stop chan struct{}
	done chan struct{}

	mu sync.Mutex
	// w receives records. For a file sink it is f itself; tests may wrap it
	// to inject failures.
	w io.Writer
	// f is the log file for a file sink, nil for a NewWriter sink. A file
	// sink can be repaired by truncation after a failed write.
	f *os.File
	// fsync flushes f to stable storage (f.Sync; tests may replace it).
	fsync func() error
	// end is the size of the file up to the end of the last good record.
	end    int64
	closed bool
	// broken is the failure that broke the log, nil while it is healthy.
	broken error

	// Group commit: records queued while a flush runs form the next batch.
	// flushing is set while one writer (the flusher) writes a batch; it
	// alone touches the sink and end then. flushed (on mu) wakes waiters,
	// and flushDone is closed (and replaced) at the same moments, for
	// writers that wait under a deadline (see commitLocked).
	pending   *batch
	flushing  bool
	flushed   sync.Cond
	flushDone chan struct{}
	// maxBacklog bounds the bytes of the pending batch while a flush is in
	// progress (DefaultMaxBacklog): a sink that hangs must not make the
	// queue behind it grow without end.
	maxBacklog int
}

// DefaultMaxBacklog bounds the records queued behind a flush in progress:
// 16 MiB, tens of thousands of records. Past it, Write refuses new records
// (ErrBacklog) until the sink takes the queue: the operations are refused,
// never unaudited.
const DefaultMaxBacklog = 16 << 20

// ErrBacklog is returned by Write when the records queued behind a flush in
// progress pass the backlog bound: the sink is not keeping up (or hangs).
var ErrBacklog = errors.New("audit: the log's sink is not keeping up: too many records are waiting to be written")

// signalFlushedLocked wakes everyone waiting for a flush to end. Called with
// mu held.
func (l *Log) signalFlushedLocked() {
	l.flushed.Broadcast()
	close(l.flushDone)
	l.flushDone = make(chan struct{})
}

// Open opens the audit log file at path for appending, creating it with mode
// 0600, and its directory with mode 0700, if needed.
//
// Open refuses a path that is a symbolic link (where the platform allows it
// to tell), that is not a regular file, or whose permissions grant any access
// to group or other. It takes an exclusive advisory lock on the file (flock,
// where available), so a second Log on the same file fails to open until the
// first is closed.
//
// If the file does not end with a complete line, because an earlier process
// crashed in the middle of a write, Open truncates it back to the end of its
// last complete line. Those bytes never formed a record, and the same is done
// after a failed [Log.Write].
func Open(path string, opts Options) (*Log, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: create log directory: %w", err)
	}
	// O_RDWR rather than O_WRONLY: repairing a torn last line needs to read
	// the end of the file.
	f, end, err := openFile(path)
	if err != nil {
		return nil, err
	}
	head, since, err := chainTail(f, end)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	if opts.Sync {
		if err := syncDir(dir); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	l := newLog(f, opts)
	l.f = f
	l.fsync = f.Sync
	l.end = end
	l.path = path
	l.head, l.since = head, since
	l.queued = int(min(since, uint64(math.MaxInt32)))
	l.startTimer()
	return l, nil
}

// openFile opens, checks, locks and repairs the log file at path.
func openFile(path string) (*os.File, int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE|oNoFollow, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("audit: open log: %w", err)
	}
	end, err := prepareFile(f)
	if err != nil {
		_ = f.Close()
		return nil, 0, err
	}
	return f, end, nil
}

// checkpointMarker is in a line exactly when it is a checkpoint record: JSON
// escapes every '"' inside a string, so no field value can hold it.
var checkpointMarker = []byte(`,"checkpoint":{`)

// chainTail reads the end of a log file: the SHA-256 of its last line (the
// next record's Prev; zero for an empty file) and how many records follow
// its last checkpoint (all of them if it has none). It reads back to the
// last checkpoint only: at most about CheckpointEvery lines.
func chainTail(f *os.File, end int64) (head [sha256.Size]byte, since uint64, err error) {
	if end == 0 {
		return head, 0, nil
	}
	const chunk = 64 << 10
	var (
		buf   []byte // the bytes from off to end
		off   = end
		first = true
	)
	for {
		// Split complete lines off the end of buf.
		for {
			i := bytes.LastIndexByte(buf[:max(len(buf)-1, 0)], '\n')
			if i < 0 && off > 0 {
				break // the line's start is not read yet
			}
			line := buf[i+1:]
			if first {
				head = sha256.Sum256(line)
				first = false
			}
			if bytes.Contains(line, checkpointMarker) {
				return head, since, nil
			}
			since++
			buf = buf[:i+1]
			if len(buf) == 0 {
				return head, since, nil
			}
		}
		n := min(int64(chunk), off)
		off -= n
		more := make([]byte, int(n)+len(buf))
		if _, err := f.ReadAt(more[:n], off); err != nil {
			return head, 0, fmt.Errorf("audit: %s: read the chain's tail: %w", f.Name(), err)
		}
		copy(more[n:], buf)
		buf = more
	}
}

// prepareFile checks, locks and repairs a freshly opened log file, and
// returns the end of its last complete record.
func prepareFile(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("audit: stat log: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return 0, fmt.Errorf("audit: %s: not a regular file (mode %v)", f.Name(), fi.Mode())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return 0, fmt.Errorf("audit: %s: mode %#o grants access to group or other, want 0600", f.Name(), perm)
	}
	if err := lockFile(f); err != nil {
		return 0, fmt.Errorf("audit: %s: lock (is another process writing this log?): %w", f.Name(), err)
	}
	end, err := lastLineEnd(f, fi.Size())
	if err != nil {
		return 0, fmt.Errorf("audit: %s: find last record: %w", f.Name(), err)
	}
	if end != fi.Size() {
		if err := f.Truncate(end); err != nil {
			return 0, fmt.Errorf("audit: %s: truncate torn last line: %w", f.Name(), err)
		}
		if err := f.Sync(); err != nil {
			return 0, fmt.Errorf("audit: %s: sync after truncating torn last line: %w", f.Name(), err)
		}
	}
	return end, nil
}

// lastLineEnd returns the offset just past the last '\n' among the first
// size bytes of f, or 0 if there is none.
func lastLineEnd(f *os.File, size int64) (int64, error) {
	buf := make([]byte, 4096)
	for off := size; off > 0; {
		n := min(int64(len(buf)), off)
		off -= n
		if _, err := f.ReadAt(buf[:n], off); err != nil {
			return 0, err
		}
		if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
			return off + int64(i) + 1, nil
		}
	}
	return 0, nil
}

// syncDir makes the directory entry of a newly created file durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("audit: open log directory: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit: sync log directory: %w", err)
	}
	return nil
}

// NewWriter returns a Log that writes records to w, for sinks other than a
// file opened with [Open], and for tests. The caller keeps ownership of w:
// [Log.Close] does not close it.
//
// Such a sink cannot be repaired after a failed or short write (even an
// *os.File: NewWriter does not know how it was opened), so the first failure
// breaks the log and every later Write returns [ErrBroken].
func NewWriter(w io.Writer, opts Options) *Log {
	l := newLog(w, opts)
	l.startTimer()
	return l
}

func newLog(w io.Writer, opts Options) *Log {
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	every := opts.CheckpointEvery
	if every == 0 {
		every = DefaultCheckpointEvery
	}
	interval := opts.CheckpointInterval
	if interval == 0 {
		interval = DefaultCheckpointInterval
	}
	l := &Log{w: w, sync: opts.Sync, now: now, signer: opts.Signer, every: every, interval: interval,
		flushDone: make(chan struct{}), maxBacklog: DefaultMaxBacklog}
	l.flushed.L = &l.mu
	return l
}

// startTimer starts the checkpoint timer of a log that signs checkpoints.
// Close stops it.
func (l *Log) startTimer() {
	if l.signer == nil || l.interval < 0 {
		return
	}
	l.stop, l.done = make(chan struct{}), make(chan struct{})
	go l.timer()
}

// timer writes a checkpoint every interval if records were written since
// the last one, and reopens a rotated log file.
func (l *Log) timer() {
	defer close(l.done)
	t := time.NewTicker(l.interval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		// Errors are not lost: a rotation not followed keeps the records
		// going to the old file, still chained; a checkpoint that fails
		// fails the records of its batch, and the next checkpoint covers
		// them.
		if l.path != "" {
			_ = l.Reopen()
		}
		_ = l.checkpoint()
	}
}

// Write appends r to the log as one JSON line and reports whether it is in
// the log. If Write returns an error, the record must be taken as not
// written and the operation it describes must be refused.
//
// The log sets r.Prev (the chain link); r.Prev and r.Checkpoint must be
// empty. Every Options.CheckpointEvery records a signed checkpoint follows
// the record, in the same write.
//
// Write returns, wrapped:
//   - ErrInvalidRecord if r breaks the rules documented on [Record]; nothing
//     is written;
//   - ctx.Err() if ctx is done before the record is queued; nothing is
//     written. Once queued, a record is written whatever ctx does, but ctx
//     still bounds how long Write waits for that: if it ends first (a sink
//     that hangs), Write returns ctx.Err() wrapped, the record is written
//     when the sink takes it, and the caller must treat it as not written;
//   - ErrBacklog if too many records already wait behind a flush in
//     progress; nothing is written;
//   - ErrClosed after Close;
//   - ErrBroken together with the original cause if this or an earlier
//     failure left the sink in an unknown state;
//   - the cause of a failed write or sync, or of a checkpoint that could
//     not be signed (nothing of the batch is written then). For a file
//     sink, Write first truncates the file back to the end of the last good
//     record, so a torn line never stays in the file; if that fails too,
//     the log breaks.
//
// A failed fsync (Options.Sync) always breaks the log: after a failed fsync
// the state of the file on disk is unknown.
func (l *Log) Write(ctx context.Context, r Record) error { return l.write(ctx, ctx, r) }

// Append is Write for a record that must be queued whatever the caller's
// context says, such as the outcome of an operation that has happened: it
// is queued even if ctx is done, and ctx bounds only how long Append waits
// for it to be written.
func (l *Log) Append(ctx context.Context, r Record) error {
	return l.write(context.Background(), ctx, r)
}

// write queues r unless queue is done, and waits until it is written or
// wait is done.
func (l *Log) write(queue, wait context.Context, r Record) error {
	if r.Prev != "" || r.Checkpoint != nil {
		return fmt.Errorf("%w: prev and checkpoint are set by the log, not the caller", ErrInvalidRecord)
	}
	r.Reason = capReason(r.Reason)
	if err := r.validate(); err != nil {
		return err
	}
	// Everything after the time is encoded before taking the lock, so that
	// concurrent writers encode in parallel and hold the lock only to stamp
	// the time and append. The chain link goes between the two; the
	// flusher fills it in.
	tail := appendTail(make([]byte, 0, 256), &r)

	l.mu.Lock()
	if err := l.usableLocked(); err != nil {
		l.mu.Unlock()
		return err
	}
	// Checked under the lock: waiting for it may have taken a while. Once the
	// record is queued it is written whatever ctx does.
	if err := queue.Err(); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("audit: record not written: %w", err)
	}
	if l.flushing && l.pending != nil && len(l.pending.lines)+len(tail) > l.maxBacklog {
		l.mu.Unlock()
		return ErrBacklog
	}
	// The time is taken under the lock so that times never go backwards
	// from one line to the next (for a monotonic clock).
	if r.Time.IsZero() {
		r.Time = l.now()
	}
	b := l.pending
	var lines []byte
	if b != nil {
		lines = b.lines
	}
	lines, err := appendHead(lines, r.Time)
	if err != nil {
		l.mu.Unlock()
		return err
	}
	if b == nil {
		b = newBatch()
		l.pending = b
	}
	split := len(lines)
	b.lines = append(lines, tail...)
	b.entries = append(b.entries, entry{end: len(b.lines), split: split})
	l.queued++
	if l.signer != nil && l.every > 0 && l.queued >= l.every {
		b.entries = append(b.entries, entry{end: len(b.lines), split: -1, t: l.now()})
		l.queued = 0
	}
	return l.commitLocked(wait, b)
}

// usableLocked returns ErrClosed or ErrBroken for a log that takes no more
// records.
// Broken returns, while the log is broken (a failed write or fsync it
// could not repair), an error wrapping ErrBroken and the cause; nil while
// it is healthy. A broken log refuses every record for good, so a server
// whose every call it must audit can serve nothing until it restarts: its
// readiness reports it.
func (l *Log) Broken() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.broken == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrBroken, l.broken)
}

func (l *Log) usableLocked() error {
	if l.closed {
		return ErrClosed
	}
	if l.broken != nil {
		return fmt.Errorf("%w: %w", ErrBroken, l.broken)
	}
	return nil
}

// commitLocked waits until b, the pending batch the caller just added to,
// is written, flushing it itself if no one else does, and returns its fate.
// It is called with mu held and releases it.
//
// Group commit: a record joins the batch being filled. If a flush is in
// progress, wait; when it ends, either our batch was written by someone
// else, or we flush it (with whatever joined it meanwhile). One write (and
// one fsync) then serves every record of the batch, and each writer learns
// the fate of the batch its record was in.
//
// The wait for another writer's flush ends when wait does: the record stays
// queued (it is written with its batch) and the caller gets wait's error. A
// writer that is itself the flusher waits for the sink as long as the sink
// takes: a write in progress cannot be taken back.
func (l *Log) commitLocked(wait context.Context, b *batch) error {
	defer l.mu.Unlock()
	for l.flushing && !b.finished {
		done := l.flushDone
		l.mu.Unlock()
		select {
		case <-done:
		case <-wait.Done():
			l.mu.Lock()
			if b.finished { // written meanwhile after all
				return b.err
			}
			if !b.adopted {
				// The batch must still be written when the flush ahead of
				// it ends, even if every writer waiting for it has given up.
				b.adopted = true
				go func() {
					l.mu.Lock()
					_ = l.commitLocked(context.Background(), b)
				}()
			}
			return fmt.Errorf("audit: record queued but not yet written (the log's sink is slow or hangs): %w", wait.Err())
		}
		l.mu.Lock()
	}
	if b.finished {
		return b.err
	}
	if l.broken != nil { // the flush before ours broke the log
		err := fmt.Errorf("%w: %w", ErrBroken, l.broken)
		b.finished, b.err = true, err
		l.pending = nil
		l.signalFlushedLocked()
		return err
	}
	l.flushing, l.pending = true, nil
	l.flushLocked(b)
	return b.err
}

// flushLocked writes b as the flusher (the caller has set l.flushing) and
// settles it: its error, the chain state, the broken state. Called with mu
// held; mu is released while the sink is written.
func (l *Log) flushLocked(b *batch) {
	l.mu.Unlock()
	st, err, broke := l.writeBatch(b)
	l.mu.Lock()
	if broke != nil {
		l.broken = broke
	}
	if err == nil {
		l.head, l.since = st.head, st.since
	}
	b.finished, b.err = true, err
	l.flushing = false
	l.signalFlushedLocked()
}

// checkpoint queues a (not final) checkpoint and waits until it is
// written; it does nothing when no record was written since the last one.
// Close writes the final one itself.
func (l *Log) checkpoint() error {
	l.mu.Lock()
	if err := l.usableLocked(); err != nil {
		l.mu.Unlock()
		return err
	}
	if l.queued == 0 && l.since == 0 {
		l.mu.Unlock()
		return nil
	}
	b := l.pending
	if b == nil {
		b = newBatch()
		l.pending = b
	}
	b.entries = append(b.entries, entry{end: len(b.lines), split: -1, t: l.now()})
	l.queued = 0
	return l.commitLocked(context.Background(), b)
}

// batch is the records of one group commit: lines holds them without their
// chain links, entries says where each ends and where its link goes.
type batch struct {
	lines    []byte
	entries  []entry
	finished bool
	err      error
	// adopted is set once a goroutine of the log's own waits to write the
	// batch for writers that stopped waiting (commitLocked).
	adopted bool
	// first holds the entries of a small batch (the usual one on a quiet
	// log), so it needs no allocation of its own.
	first [2]entry
}

// newBatch returns an empty batch.
func newBatch() *batch {
	b := &batch{}
	b.entries = b.first[:0]
	return b
}

// entry is one line of a batch: a record, lines[previous end:end] with its
// Prev to be put at split, or (split < 0) a checkpoint stamped t.
type entry struct {
	end, split int
	final      bool
	t          time.Time
}

// chainState is the chain after a batch: the hash of its last line and the
// records after its last checkpoint.
type chainState struct {
	head  [sha256.Size]byte
	since uint64
}

// assemble renders b into l.out with every chain link filled in and every
// checkpoint signed, and returns the chain state after it. Only the flusher
// calls it. Each link is the SHA-256 of the line just rendered: no copy,
// no allocation per record.
func (l *Log) assemble(b *batch) ([]byte, chainState, error) {
	st := chainState{head: l.head, since: l.since}
	out := l.out[:0]
	start := 0
	for _, e := range b.entries {
		lineStart := len(out)
		if e.split < 0 {
			var err error
			if out, err = l.appendCheckpoint(out, st, e); err != nil {
				l.out = out[:0]
				return nil, chainState{}, err
			}
			st.since = 0
		} else {
			out = append(out, b.lines[start:e.split]...)
			out = append(out, `,"prev":"`...)
			out = hex.AppendEncode(out, st.head[:])
			out = append(out, '"')
			out = append(out, b.lines[e.split:e.end]...)
			start = e.end
			st.since++
		}
		st.head = sha256.Sum256(out[lineStart:])
	}
	l.out = out
	return out, st, nil
}

// writeBatch writes one batch with a single write call (and one fsync). Only
// the one flusher calls it, so it owns the sink and l.end. It returns the
// chain state after the batch, the error every writer of the batch gets,
// and the cause if the log broke.
func (l *Log) writeBatch(b *batch) (st chainState, err, broke error) {
	lines, st, err := l.assemble(b)
	if err != nil {
		return st, fmt.Errorf("audit: %w", err), nil // nothing was written
	}
	n, err := l.w.Write(lines)
	if err == nil && n != len(lines) {
		err = io.ErrShortWrite
	}
	if err != nil {
		err, broke = l.fail(fmt.Errorf("write record: %w", err), false)
		return st, err, broke
	}
	if l.sync {
		if err := l.syncSink(); err != nil {
			err, broke = l.fail(fmt.Errorf("sync record: %w", err), true)
			return st, err, broke
		}
	}
	l.end += int64(n)
	return st, nil, nil
}

// syncSink flushes the sink to stable storage.
func (l *Log) syncSink() error {
	if l.f != nil {
		return l.fsync()
	}
	if s, ok := l.w.(interface{ Sync() error }); ok {
		return s.Sync()
	}
	return nil
}

// fail deals with a batch that may be partly or wholly in the sink, and
// returns the error for its writers and, if the log must break, the cause.
// A file sink is truncated back to the last good end; any other sink cannot
// be repaired and breaks the log. Called only by the flusher.
func (l *Log) fail(cause error, mustBreak bool) (err, broke error) {
	if l.f == nil {
		mustBreak = true
	} else if err := l.truncate(); err != nil {
		cause = fmt.Errorf("%w; then %w", cause, err)
		mustBreak = true
	}
	if mustBreak {
		return fmt.Errorf("%w: %w", ErrBroken, cause), cause
	}
	return fmt.Errorf("audit: %w", cause), nil
}

// truncate cuts the file back to the end of the last good record.
func (l *Log) truncate() error {
	if err := l.f.Truncate(l.end); err != nil {
		return fmt.Errorf("truncate to last good record at offset %d: %w", l.end, err)
	}
	if l.sync {
		if err := l.fsync(); err != nil {
			return fmt.Errorf("sync after truncate: %w", err)
		}
	}
	return nil
}

// Reopen follows an operator's rotation of a log made with [Open]: if its
// path no longer names the file being written (it was renamed or removed),
// Reopen flushes and closes that file and opens the path anew, with Open's
// checks. The chain carries over: the first record of a new, empty file
// links to the last record of the old one. (If the path names a non-empty
// file, the chain continues from that file's last line, and a verifier
// sees the break.) If the path still names the file, Reopen does nothing.
// A log that signs checkpoints does this itself every CheckpointInterval;
// call Reopen to follow a rotation at once (on SIGHUP, say).
func (l *Log) Reopen() error {
	if l.path == "" {
		return errors.New("audit: reopen: the log has no file path (NewWriter)")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.usableLocked(); err != nil {
		return err
	}
	// Become the flusher: the sink is ours until we are done.
	for l.flushing {
		l.flushed.Wait()
	}
	if err := l.usableLocked(); err != nil {
		return err
	}
	l.flushing = true
	l.mu.Unlock()
	st, changed, err := l.reopen()
	l.mu.Lock()
	if changed {
		l.head, l.since = st.head, st.since
		l.queued = int(min(st.since, uint64(math.MaxInt32)))
	}
	l.flushing = false
	l.signalFlushedLocked()
	return err
}

// reopen is Reopen's work, done as the flusher.
func (l *Log) reopen() (st chainState, changed bool, err error) {
	cur, err := l.f.Stat()
	if err != nil {
		return st, false, fmt.Errorf("audit: reopen: stat the open log: %w", err)
	}
	if fi, err := os.Lstat(l.path); err == nil && os.SameFile(cur, fi) {
		return st, false, nil
	}
	f, end, err := openFile(l.path)
	if err != nil {
		return st, false, fmt.Errorf("audit: reopen: %w", err)
	}
	st = chainState{head: l.head, since: l.since}
	if end > 0 {
		if st.head, st.since, err = chainTail(f, end); err != nil {
			_ = f.Close()
			return chainState{}, false, err
		}
	}
	if l.sync {
		if err := syncDir(filepath.Dir(l.path)); err != nil {
			_ = f.Close()
			return chainState{}, false, err
		}
	}
	var errs []error
	if err := l.fsync(); err != nil {
		errs = append(errs, fmt.Errorf("audit: reopen: sync the old log: %w", err))
	}
	if err := l.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("audit: reopen: close the old log: %w", err))
	}
	l.f, l.w, l.fsync, l.end = f, f, f.Sync, end
	return st, true, errors.Join(errs...)
}

// Close closes the log. If the log signs checkpoints, it first writes a
// final checkpoint (Checkpoint.Final). For a log made with [Open] it flushes
// the file to stable storage and closes it, and returns any error from
// either; a log made with [NewWriter] leaves its writer open. Later calls to
// Write and Close return [ErrClosed].
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.closed = true
	l.mu.Unlock()
	if l.stop != nil {
		close(l.stop)
		<-l.done
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// Let a flush in progress, and the batch queued behind it, finish: their
	// writers are waiting for the outcome.
	for l.flushing || l.pending != nil {
		if !l.flushing && l.pending != nil {
			p := l.pending
			l.pending, l.flushing = nil, true
			l.flushLocked(p)
			continue
		}
		l.flushed.Wait()
	}
	var errs []error
	if l.signer != nil && l.broken == nil {
		b := newBatch()
		b.entries = append(b.entries, entry{split: -1, final: true, t: l.now()})
		l.flushing = true
		l.flushLocked(b)
		if b.err != nil {
			errs = append(errs, fmt.Errorf("audit: final checkpoint: %w", b.err))
		}
	}
	if l.f == nil {
		return errors.Join(errs...)
	}
	if err := l.fsync(); err != nil {
		errs = append(errs, fmt.Errorf("audit: sync log: %w", err))
	}
	if err := l.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("audit: close log: %w", err))
	}
	return errors.Join(errs...)
}

// ReadFile reads and parses the audit log at path. It is strict: every line
// must be a complete, valid record ending in '\n'. For the first line that is
// not, it returns a [*ParseError] that wraps [ErrMalformed] and gives the line
// number.
func ReadFile(path string) ([]Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	defer f.Close() // read-only: nothing to lose on close

	var recs []Record
	br := bufio.NewReader(f)
	for n := 1; ; n++ {
		line, err := br.ReadBytes('\n')
		if err == io.EOF {
			if len(line) > 0 {
				return nil, &ParseError{Path: path, Line: n, Err: fmt.Errorf("%w: incomplete last line", ErrMalformed)}
			}
			return recs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("audit: read %s: %w", path, err)
		}
		r, err := parseLine(line[:len(line)-1])
		if err != nil {
			return nil, &ParseError{Path: path, Line: n, Err: err}
		}
		recs = append(recs, r)
	}
}
