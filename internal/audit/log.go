package audit

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
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
}

// Log is an append-only audit log. It is safe for concurrent use; records
// are written one at a time, each with a single write call to the sink, so
// lines never interleave.
//
// A Log must be made with [Open] or [NewWriter].
type Log struct {
	sync bool
	now  func() time.Time

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
	// alone touches the sink and end then. flushed (on mu) wakes waiters.
	pending  *batch
	flushing bool
	flushed  sync.Cond
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
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE|oNoFollow, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open log: %w", err)
	}
	end, err := prepareFile(f)
	if err != nil {
		_ = f.Close() // the error from prepareFile is the one that matters
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
	return l, nil
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
	return newLog(w, opts)
}

func newLog(w io.Writer, opts Options) *Log {
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	l := &Log{w: w, sync: opts.Sync, now: now}
	l.flushed.L = &l.mu
	return l
}

// Write appends r to the log as one JSON line and reports whether it is in
// the log. If Write returns an error, the record must be taken as not
// written and the operation it describes must be refused.
//
// Write returns, wrapped:
//   - ErrInvalidRecord if r breaks the rules documented on [Record]; nothing
//     is written;
//   - ctx.Err() if ctx is done before the record is written; nothing is
//     written;
//   - ErrClosed after Close;
//   - ErrBroken together with the original cause if this or an earlier
//     failure left the sink in an unknown state;
//   - the cause of a failed write or sync. For a file sink, Write first
//     truncates the file back to the end of the last good record, so a torn
//     line never stays in the file; if that fails too, the log breaks.
//
// A failed fsync (Options.Sync) always breaks the log: after a failed fsync
// the state of the file on disk is unknown.
func (l *Log) Write(ctx context.Context, r Record) error {
	r.Reason = capReason(r.Reason)
	if err := r.validate(); err != nil {
		return err
	}
	// Everything after the time is encoded before taking the lock, so that
	// concurrent writers encode in parallel and hold the lock only to stamp
	// the time and append.
	tail := appendTail(make([]byte, 0, 256), &r)

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	if l.broken != nil {
		err := fmt.Errorf("%w: %w", ErrBroken, l.broken)
		l.mu.Unlock()
		return err
	}
	// Checked under the lock: waiting for it may have taken a while. Once the
	// record is queued it is written whatever ctx does.
	if err := ctx.Err(); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("audit: record not written: %w", err)
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
		b = &batch{}
		l.pending = b
	}
	b.lines = append(lines, tail...)

	// Group commit: the record joins the batch being filled. If a flush is
	// in progress, wait; when it ends, either our batch was written by
	// someone else, or we flush it (with whatever joined it meanwhile). One
	// write (and one fsync) then serves every record of the batch, and each
	// writer learns the fate of the batch its record was in.
	for l.flushing && !b.finished {
		l.flushed.Wait()
	}
	if b.finished {
		err := b.err
		l.mu.Unlock()
		return err
	}
	if l.broken != nil { // the flush before ours broke the log
		err := fmt.Errorf("%w: %w", ErrBroken, l.broken)
		b.finished, b.err = true, err
		l.pending = nil
		l.flushed.Broadcast()
		l.mu.Unlock()
		return err
	}
	l.flushing, l.pending = true, nil
	l.mu.Unlock()

	err, broke := l.writeBatch(b.lines)

	l.mu.Lock()
	if broke != nil {
		l.broken = broke
	}
	b.finished, b.err = true, err
	l.flushing = false
	l.flushed.Broadcast()
	l.mu.Unlock()
	return err
}

// batch is the records of one group commit.
type batch struct {
	lines    []byte
	finished bool
	err      error
}

// writeBatch writes one batch with a single write call (and one fsync). Only
// the one flusher calls it, so it owns the sink and l.end. It returns the
// error every writer of the batch gets, and the cause if the log broke.
func (l *Log) writeBatch(lines []byte) (err, broke error) {
	n, err := l.w.Write(lines)
	if err == nil && n != len(lines) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return l.fail(fmt.Errorf("write record: %w", err), false)
	}
	if l.sync {
		if err := l.syncSink(); err != nil {
			return l.fail(fmt.Errorf("sync record: %w", err), true)
		}
	}
	l.end += int64(n)
	return nil, nil
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

// Close closes the log. For a log made with [Open] it flushes the file to
// stable storage and closes it, and returns any error from either; a log made
// with [NewWriter] leaves its writer open. Later calls to Write and Close
// return [ErrClosed].
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	l.closed = true
	// Let a flush in progress, and the batch queued behind it, finish: their
	// writers are waiting for the outcome.
	for l.flushing || l.pending != nil {
		if !l.flushing && l.pending != nil {
			p := l.pending
			l.pending, l.flushing = nil, true
			l.mu.Unlock()
			err, broke := l.writeBatch(p.lines)
			l.mu.Lock()
			if broke != nil {
				l.broken = broke
			}
			p.finished, p.err = true, err
			l.flushing = false
			l.flushed.Broadcast()
			continue
		}
		l.flushed.Wait()
	}
	if l.f == nil {
		return nil
	}
	var errs []error
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
