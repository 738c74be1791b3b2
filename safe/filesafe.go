package safe

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/argon2"

	"github.com/cairnkms/cairn/internal/secret"
)

// FileSafeConfig configures an insecure file safe.
type FileSafeConfig struct {
	// Dir holds the safe: safe.json (KDF salt and parameters, a passphrase
	// check) and shares/*.sealed. Created 0700 on first use.
	Dir string
	// Label names the safe; it must match the label recorded in Dir if the
	// safe exists already.
	Label string
	// Passphrase derives the sealing key (argon2id). Open copies it; the
	// caller wipes its own.
	Passphrase secret.Bytes
	// KDFMemoryKiB is argon2id's memory for a NEW safe (0: 64 MiB). An
	// existing safe keeps the parameters it was created with.
	KDFMemoryKiB uint32
	// AttemptDir keeps the failed-passphrase counter (required).
	AttemptDir string
	// MaxAttempts, Cooldown and Now configure the counter (0/nil: defaults).
	MaxAttempts int
	Cooldown    time.Duration
	Now         func() time.Time
}

// FileSafe is a safe whose sealing key is derived from a passphrase with
// argon2id and whose sealed shares are files. It exists for development and
// tests: the key is only as strong as the passphrase and lives in process
// memory, not in an HSM. Its kind, "insecure-file", is written into every
// manifest that uses it.
type FileSafe struct {
	dir, label string
	key        secret.Bytes
	mu         sync.Mutex // serialises seal/destroy (check-then-create)
	closed     bool
}

type fileSafeMeta struct {
	Format    int    `json:"format"`
	Kind      string `json:"kind"`
	Label     string `json:"label"`
	Salt      []byte `json:"salt"`
	Time      uint32 `json:"argon2id_time"`
	MemoryKiB uint32 `json:"argon2id_memory_kib"`
	Threads   uint8  `json:"argon2id_threads"`
	// Check is HMAC-SHA256(key, "cairn/file-safe/v1 check"): it tells a wrong
	// passphrase from a tampered share.
	Check []byte `json:"check"`
}

var labelPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// OpenFileSafe opens the file safe in cfg.Dir, creating it if it does not
// exist. A wrong passphrase returns ErrBadCredential and counts against the
// attempt limit; too many return ErrLocked.
func OpenFileSafe(cfg FileSafeConfig) (*FileSafe, error) {
	switch {
	case cfg.Dir == "":
		return nil, errors.New("safe: file safe needs a directory")
	case !labelPattern.MatchString(cfg.Label):
		return nil, fmt.Errorf("safe: file safe label %q: use 1-64 of A-Z a-z 0-9 . _ -", cfg.Label)
	case cfg.Passphrase.Len() < 8:
		return nil, errors.New("safe: file safe passphrase must be at least 8 bytes")
	}
	limiter, err := NewAttemptLimiter(cfg.AttemptDir, "insecure-file-"+cfg.Label, cfg.MaxAttempts, cfg.Cooldown, cfg.Now)
	if err != nil {
		return nil, err
	}
	if err := limiter.Check(); err != nil {
		return nil, fmt.Errorf("safe: file safe %s: %w", cfg.Label, err)
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "shares"), 0o700); err != nil {
		return nil, fmt.Errorf("safe: file safe %s: %w", cfg.Label, err)
	}
	metaPath := filepath.Join(cfg.Dir, "safe.json")
	meta, err := readFileSafeMeta(metaPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		meta, err = newFileSafeMeta(cfg)
		if err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case meta.Label != cfg.Label:
		return nil, fmt.Errorf("safe: %s holds file safe %q, not %q", cfg.Dir, meta.Label, cfg.Label)
	}
	key := deriveFileSafeKey(cfg.Passphrase, meta)
	if meta.Check == nil {
		meta.Check = fileSafeCheck(key)
		if err := writeNew(metaPath, mustJSON(meta)); err != nil {
			key.Wipe()
			return nil, fmt.Errorf("safe: creating file safe %s: %w", cfg.Label, err)
		}
	} else if !hmac.Equal(fileSafeCheck(key), meta.Check) {
		key.Wipe()
		if err := limiter.Failure(); err != nil {
			return nil, errors.Join(ErrBadCredential, err)
		}
		return nil, fmt.Errorf("safe: file safe %s: %w", cfg.Label, ErrBadCredential)
	}
	if err := limiter.Success(); err != nil {
		key.Wipe()
		return nil, err
	}
	return &FileSafe{dir: cfg.Dir, label: cfg.Label, key: key}, nil
}

// The argon2id parameters a file safe description may ask for. The floor
// keeps the passphrase expensive to guess; the ceilings keep a tampered
// safe.json from making the safe tool allocate terabytes or spin for hours
// before it can even refuse the passphrase.
const (
	minKDFMemoryKiB = 8 * 1024
	maxKDFMemoryKiB = 4 * 1024 * 1024 // 4 GiB
	maxKDFTime      = 16
	maxKDFThreads   = 16
)

func newFileSafeMeta(cfg FileSafeConfig) (fileSafeMeta, error) {
	mem := cfg.KDFMemoryKiB
	if mem == 0 {
		mem = 64 * 1024
	}
	if mem < minKDFMemoryKiB || mem > maxKDFMemoryKiB {
		return fileSafeMeta{}, fmt.Errorf("safe: argon2id memory %d KiB is outside [8 MiB, 4 GiB]", mem)
	}
	salt := make([]byte, 16)
	_, _ = rand.Read(salt)
	return fileSafeMeta{Format: 1, Kind: KindInsecureFile, Label: cfg.Label, Salt: salt, Time: 3, MemoryKiB: mem, Threads: 2}, nil
}

func readFileSafeMeta(path string) (fileSafeMeta, error) {
	var m fileSafeMeta
	data, err := os.ReadFile(path)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(data, &m); err != nil || m.Format != 1 || m.Kind != KindInsecureFile || len(m.Salt) < 16 ||
		m.MemoryKiB < minKDFMemoryKiB || m.MemoryKiB > maxKDFMemoryKiB || m.Time < 1 || m.Time > maxKDFTime || m.Threads < 1 || m.Threads > maxKDFThreads {
		return m, fmt.Errorf("safe: %s is not a valid file safe description", path)
	}
	return m, nil
}

func deriveFileSafeKey(pass secret.Bytes, m fileSafeMeta) secret.Bytes {
	p := pass.Data()
	defer clear(p)
	k := argon2.IDKey(p, m.Salt, m.Time, m.MemoryKiB, m.Threads, 32)
	defer clear(k)
	return secret.New(k)
}

func fileSafeCheck(key secret.Bytes) []byte {
	k := key.Data()
	defer clear(k)
	h := hmac.New(sha256.New, k)
	h.Write([]byte("cairn/file-safe/v1 check"))
	return h.Sum(nil)
}

func mustJSON(v any) []byte {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		panic(err) // only plain structs are encoded
	}
	return b
}

// writeNew writes data to path only if path does not exist, atomically
// (temp file, fsync, hard link), mode 0600.
func writeNew(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".new-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return ErrExists
		}
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Label implements Safe.
func (s *FileSafe) Label() string { return s.label }

// Kind implements Safe: KindInsecureFile.
func (s *FileSafe) Kind() string { return KindInsecureFile }

func (s *FileSafe) sharePath(ref ShareRef) string {
	return filepath.Join(s.dir, "shares", fmt.Sprintf("%s-%d-%d.sealed", ref.GenesisID, ref.Epoch, ref.Index))
}

func (s *FileSafe) aead() (cipher.AEAD, error) {
	k := s.key.Data()
	defer clear(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func (s *FileSafe) check(ctx context.Context, ref ShareRef) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := ref.Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return nil
}

// Seal implements Safe.
func (s *FileSafe) Seal(ctx context.Context, ref ShareRef, share secret.Bytes) error {
	if err := s.check(ctx, ref); err != nil {
		return err
	}
	if share.IsZero() {
		return errors.New("safe: empty share")
	}
	gcm, err := s.aead()
	if err != nil {
		return err
	}
	nonce := make([]byte, NonceSize)
	_, _ = rand.Read(nonce)
	pt := share.Data()
	ct := gcm.Seal(nil, nonce, pt, ShareAAD(ref))
	clear(pt)
	rec, err := EncodeSealed(ref, "argon2id", nonce, ct)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if err := writeNew(s.sharePath(ref), rec); err != nil {
		if errors.Is(err, ErrExists) {
			return fmt.Errorf("%w: %s in %s", ErrExists, ref, s.label)
		}
		return fmt.Errorf("safe: sealing %s into %s: %w", ref, s.label, err)
	}
	return nil
}

// Unseal implements Safe.
func (s *FileSafe) Unseal(ctx context.Context, ref ShareRef) (secret.Bytes, error) {
	if err := s.check(ctx, ref); err != nil {
		return secret.Bytes{}, err
	}
	data, err := os.ReadFile(s.sharePath(ref))
	if errors.Is(err, os.ErrNotExist) {
		return secret.Bytes{}, fmt.Errorf("%w: %s in %s", ErrNotFound, ref, s.label)
	}
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("safe: reading %s from %s: %w", ref, s.label, err)
	}
	rec, err := DecodeSealed(data, ref)
	if err != nil {
		return secret.Bytes{}, err
	}
	gcm, err := s.aead()
	if err != nil {
		return secret.Bytes{}, err
	}
	pt, err := gcm.Open(nil, rec.GetNonce(), rec.GetCiphertext(), ShareAAD(ref))
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("%w: %s in %s", ErrTampered, ref, s.label)
	}
	defer clear(pt)
	return secret.New(pt), nil
}

// List implements Safe.
func (s *FileSafe) List(ctx context.Context) ([]ShareRef, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	entries, err := os.ReadDir(filepath.Join(s.dir, "shares"))
	if err != nil {
		return nil, fmt.Errorf("safe: listing %s: %w", s.label, err)
	}
	var out []ShareRef
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".sealed")
		if !ok || strings.HasPrefix(name, ".") {
			continue
		}
		parts := strings.Split(name, "-")
		if len(parts) != 3 {
			continue
		}
		epoch, err1 := strconv.ParseUint(parts[1], 10, 32)
		index, err2 := strconv.ParseUint(parts[2], 10, 32)
		ref := ShareRef{GenesisID: parts[0], Epoch: uint32(epoch), Index: uint32(index)}
		if err1 != nil || err2 != nil || ref.Validate() != nil {
			continue
		}
		out = append(out, ref)
	}
	return out, nil
}

// Destroy implements Safe.
func (s *FileSafe) Destroy(ctx context.Context, ref ShareRef) error {
	if err := s.check(ctx, ref); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	path := s.sharePath(ref)
	// Overwrite before unlinking: a plain unlink leaves the ciphertext in
	// free blocks (of limited value with the key elsewhere, but cheap).
	if fi, err := os.Stat(path); err == nil {
		if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
			_, _ = f.Write(make([]byte, fi.Size()))
			_ = f.Sync()
			f.Close()
		}
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: %s in %s", ErrNotFound, ref, s.label)
		}
		return fmt.Errorf("safe: destroying %s in %s: %w", ref, s.label, err)
	}
	return syncDir(filepath.Dir(path))
}

// Close implements Safe: it wipes the derived key.
func (s *FileSafe) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		s.key.Wipe()
	}
	return nil
}
