// Package pkcs11safe is the production safe.Safe: a PKCS#11 token (an HSM,
// or SoftHSM2 in tests) that seals Shamir shares of the root master key under
// an AES-256 key generated on the token, which never leaves it.
//
// A share is encrypted on the token with CKM_AES_GCM under the sealing key
// (associated data safe.ShareAAD, a fresh 12-byte IV per seal) and the
// resulting safe.EncodeSealed record is stored on the same token as a private
// CKO_DATA object:
//
//	CKA_CLASS=CKO_DATA CKA_TOKEN=true CKA_PRIVATE=true CKA_MODIFIABLE=false
//	CKA_APPLICATION="cairn" CKA_LABEL="cairn-share:<genesis id>:<epoch>:<index>"
//	CKA_VALUE=<record>
//
// Records are not modifiable: a share is replaced only by destroying it and
// sealing again. Reading a record needs a login (CKA_PRIVATE), and opening it
// needs the sealing key, whose template makes it sensitive, non-extractable
// and usable only to encrypt and decrypt (see keyTemplate).
//
// This is the only package of Cairn that uses cgo and PKCS#11. It loads each
// library once per process (see module), logs in once per token, and runs
// operations on a bounded pool of sessions. Failed logins are counted by a
// safe.AttemptLimiter, because SoftHSM2 never locks its PIN.
//
// What this package cannot control: github.com/miekg/pkcs11 copies the PIN
// into a C string and the decrypted share into a C buffer, and frees both
// without zeroing them. The Go copies made here are cleared.
package pkcs11safe

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
)

// application is the CKA_APPLICATION of every record this package stores.
const application = "cairn"

// labelPrefix starts the CKA_LABEL of every record.
const labelPrefix = "cairn-share:"

// tagBits is the GCM tag length.
const tagBits = 128

// Safe is a PKCS#11 token used as a safe.Safe. It is safe for concurrent use.
type Safe struct {
	label    string // token label
	keyLabel string
	mod      *module
	slot     uint
	tokenKey string // serial/label, as claimed in mod
	key      pkcs11.ObjectHandle
	ownLogin bool // this Safe's C_Login succeeded, so Close logs out
	// anchor is the session the Safe logged in on. It runs no operation
	// and stays open until Close: PKCS#11 logs the user out when the
	// application's last session on the token closes, and the pool closes
	// and reopens its sessions.
	anchor pkcs11.SessionHandle
	pool   *pool

	mu       sync.Mutex // guards closed and inflight.Add
	closed   bool
	closing  chan struct{} // closed by Close: session waiters give up
	inflight sync.WaitGroup

	// storeMu orders the operations on the token's objects: Seal and
	// Destroy hold it exclusively, Unseal and List shared. It makes "is
	// there a record for ref?" and "create it" one step for this Safe (and
	// so for this process: one Safe per token). It also keeps searches
	// away from object creation, which SoftHSM2 2.6.1 fails at random
	// (C_CreateObject returns CKR_GENERAL_ERROR) while another session of
	// the process searches the same token (SoftHSMv2 issue #573). Another
	// process using the same token is not covered: one token has one safe
	// tool.
	storeMu sync.RWMutex

	// hookHeld, if set (by tests, before any operation), runs while an
	// operation holds its session, before the operation starts. It gets
	// the operation's context, so a test can tell the callers apart (and
	// cancel the one holding the session).
	hookHeld func(ctx context.Context)
}

var _ safe.Safe = (*Safe)(nil)

// Open finds the token labelled cfg.TokenLabel, logs in with the PIN from
// cfg.PIN (unless the attempt limiter says the safe is locked: then it
// returns an error wrapping safe.ErrLocked without asking for the PIN), and
// finds or generates the sealing key. A wrong PIN is an error wrapping
// safe.ErrBadCredential and counts as a failed attempt.
//
// A process may have one Safe per token at a time. Tokens created after the
// process loaded the library may be invisible until every Safe using that
// library is closed (SoftHSM2 scans its token directory at C_Initialize).
func Open(ctx context.Context, cfg Config) (_ *Safe, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pkcs11safe: open token %q: %w", cfg.TokenLabel, err)
	}
	// undo unwinds what Open did so far if it fails.
	var undo []func()
	defer func() {
		if err != nil {
			for _, f := range slices.Backward(undo) {
				f()
			}
		}
	}()

	mod, err := acquireModule(cfg.Module)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { _ = mod.release() })

	slot, info, err := findToken(mod, cfg.Module, cfg.TokenLabel)
	if err != nil {
		return nil, err
	}
	tokenKey := info.SerialNumber + "/" + cfg.TokenLabel
	if err := mod.claimToken(tokenKey, cfg.TokenLabel); err != nil {
		return nil, err
	}
	undo = append(undo, func() { mod.releaseToken(tokenKey) })

	s := &Safe{
		label:    cfg.TokenLabel,
		keyLabel: cfg.KeyLabel,
		mod:      mod,
		slot:     slot,
		tokenKey: tokenKey,
		closing:  make(chan struct{}),
	}
	s.pool = newPool(mod.ctx, slot, cfg.MaxSessions, s.closing)
	undo = append(undo, func() { _ = s.pool.shutdown() })

	limiter, err := safe.NewAttemptLimiter(cfg.AttemptDir, "pkcs11-"+info.SerialNumber+"-"+cfg.TokenLabel, cfg.MaxAttempts, cfg.Cooldown, cfg.Now)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: token %q: %w", s.label, err)
	}
	s.anchor, err = mod.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: token %q: C_OpenSession: %w", s.label, err)
	}
	undo = append(undo, func() { _ = s.closeAnchor() })
	if err := s.login(s.anchor, info, cfg.PIN, limiter); err != nil {
		return nil, err
	}
	sh, err := s.pool.acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: open token %q: %w", s.label, err)
	}
	s.key, err = s.sealingKey(sh)
	s.pool.release(sh, err)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// closeAnchor logs out (if this Safe logged in) and closes the anchor
// session. Every other session of the Safe must be closed after it or
// before.
func (s *Safe) closeAnchor() error {
	var errs []error
	if s.ownLogin {
		if err := s.mod.ctx.Logout(s.anchor); err != nil && !isRV(err, pkcs11.CKR_USER_NOT_LOGGED_IN) {
			errs = append(errs, fmt.Errorf("C_Logout: %w", err))
		}
	}
	if err := s.mod.ctx.CloseSession(s.anchor); err != nil && !isRV(err, pkcs11.CKR_SESSION_HANDLE_INVALID) {
		errs = append(errs, fmt.Errorf("C_CloseSession: %w", err))
	}
	return errors.Join(errs...)
}

// errLoggedOut says that the token no longer has this process logged in
// (something logged it out, or closed all its sessions). The PIN is gone,
// so the Safe cannot log in again: it must be reopened.
var errLoggedOut = fmt.Errorf("the token logged this process out; close and reopen the safe: %w", pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))

// checkLoggedIn returns errLoggedOut unless sh is a user session. Private
// objects are invisible without a login, so a search that finds nothing
// means "not found" only if this holds.
func (s *Safe) checkLoggedIn(sh pkcs11.SessionHandle) error {
	info, err := s.mod.ctx.GetSessionInfo(sh)
	if err != nil {
		return fmt.Errorf("C_GetSessionInfo: %w", err)
	}
	if info.State != pkcs11.CKS_RW_USER_FUNCTIONS && info.State != pkcs11.CKS_RO_USER_FUNCTIONS {
		return errLoggedOut
	}
	return nil
}

// findToken returns the slot of the one initialized token labelled label.
func findToken(mod *module, path, label string) (uint, pkcs11.TokenInfo, error) {
	slots, err := mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("pkcs11safe: C_GetSlotList of PKCS#11 module %s: %w", path, err)
	}
	var (
		found  []uint
		info   pkcs11.TokenInfo
		labels []string
	)
	for _, slot := range slots {
		ti, err := mod.ctx.GetTokenInfo(slot)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue // removed meanwhile, or SoftHSM2's free slot
		}
		labels = append(labels, ti.Label)
		if ti.Label == label {
			found = append(found, slot)
			info = ti
		}
	}
	switch len(found) {
	case 0:
		return 0, info, fmt.Errorf("pkcs11safe: no token labelled %q in PKCS#11 module %s (tokens seen: %q; a token created after this process loaded the module may be invisible until every Safe using it closes)", label, path, labels)
	case 1:
		return found[0], info, nil
	default:
		return 0, info, fmt.Errorf("pkcs11safe: %d tokens labelled %q in PKCS#11 module %s; labels must be unique", len(found), label, path)
	}
}

// login logs the user in on sh, guarded by limiter. It wipes the PIN.
func (s *Safe) login(sh pkcs11.SessionHandle, info pkcs11.TokenInfo, src PINSource, limiter *safe.AttemptLimiter) error {
	if err := limiter.Check(); err != nil {
		return fmt.Errorf("pkcs11safe: token %q: %w", s.label, err)
	}
	if info.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
		return fmt.Errorf("pkcs11safe: token %q has locked its user PIN itself (ask its security officer): %w", s.label, safe.ErrLocked)
	}
	if info.Flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0 {
		return fmt.Errorf("pkcs11safe: token %q has no user PIN yet (initialize it with the security officer PIN)", s.label)
	}
	pin, err := src.read()
	if err != nil {
		return fmt.Errorf("pkcs11safe: token %q: %w", s.label, err)
	}
	b := pin.Data()
	pin.Wipe()
	// Login takes a string. View the copy b as one instead of copying it
	// into an immutable string that could not be cleared; b is cleared
	// once Login returns, and nothing keeps the string.
	err = s.mod.ctx.Login(sh, pkcs11.CKU_USER, unsafe.String(unsafe.SliceData(b), len(b)))
	clear(b)
	switch {
	case err == nil:
		s.ownLogin = true
		if err := limiter.Success(); err != nil {
			return fmt.Errorf("pkcs11safe: token %q: %w", s.label, err)
		}
		return nil
	case isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN):
		// Logged in by some other code of this process (never by another
		// Safe: see claimToken). The token did not check the PIN, so the
		// attempt counter is left as it is, and Close does not log out
		// what it did not log in.
		return nil
	case isRV(err, pkcs11.CKR_PIN_INCORRECT), isRV(err, pkcs11.CKR_PIN_LEN_RANGE):
		return errors.Join(fmt.Errorf("pkcs11safe: token %q: %w", s.label, safe.ErrBadCredential), limiter.Failure())
	case isRV(err, pkcs11.CKR_PIN_LOCKED):
		return fmt.Errorf("pkcs11safe: token %q has locked its user PIN itself (ask its security officer): %w", s.label, safe.ErrLocked)
	default:
		return fmt.Errorf("pkcs11safe: token %q: C_Login: %w", s.label, err)
	}
}

// Label returns the token label.
func (s *Safe) Label() string { return s.label }

// Kind returns safe.KindPKCS11.
func (s *Safe) Kind() string { return safe.KindPKCS11 }

// do runs f with a session from the pool, unless the Safe is closed or ctx
// ends first.
func (s *Safe) do(ctx context.Context, f func(sh pkcs11.SessionHandle) error) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return safe.ErrClosed
	}
	s.inflight.Add(1)
	s.mu.Unlock()
	defer s.inflight.Done()

	if err := ctx.Err(); err != nil {
		return err
	}
	sh, err := s.pool.acquire(ctx)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		s.pool.release(sh, nil)
		return err
	}
	if s.hookHeld != nil {
		s.hookHeld(ctx)
	}
	err = f(sh)
	s.pool.release(sh, err)
	return err
}

// Seal encrypts share on the token and stores the record under ref. It
// decrypts the new ciphertext and reads the stored record back before it
// returns, so that a share is never reported sealed unless it can be
// unsealed.
func (s *Safe) Seal(ctx context.Context, ref safe.ShareRef, share secret.Bytes) error {
	if err := ref.Validate(); err != nil {
		return fmt.Errorf("pkcs11safe: seal: %w", err)
	}
	if share.IsZero() {
		return fmt.Errorf("pkcs11safe: seal %s: empty share", ref)
	}
	err := s.do(ctx, func(sh pkcs11.SessionHandle) error {
		s.storeMu.Lock()
		defer s.storeMu.Unlock()
		existing, err := findObjects(s.mod.ctx, sh, recordTemplate(ref))
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			return safe.ErrExists
		}
		if err := s.checkLoggedIn(sh); err != nil {
			return err
		}
		record, err := s.encrypt(sh, ref, share)
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err // nothing stored
		}
		obj, err := s.createRecord(sh, ref, record)
		if err != nil {
			return err
		}
		stored, err := s.readRecord(sh, obj)
		if err == nil && bytes.Equal(stored, record) {
			return nil
		}
		if derr := s.mod.ctx.DestroyObject(sh, obj); derr != nil {
			return fmt.Errorf("the stored record does not read back as written (%v), and destroying it failed: %w", err, derr)
		}
		return fmt.Errorf("the stored record does not read back as written (%v); destroyed it", err)
	})
	if err != nil {
		return fmt.Errorf("pkcs11safe: seal %s on token %q: %w", ref, s.label, err)
	}
	return nil
}

// encrypt seals share for ref with AES-GCM on the token and returns the
// encoded record, after checking that it decrypts to share.
func (s *Safe) encrypt(sh pkcs11.SessionHandle, ref safe.ShareRef, share secret.Bytes) ([]byte, error) {
	pt := share.Data()
	defer clear(pt)
	iv := make([]byte, safe.NonceSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("reading an IV: %w", err)
	}
	aad := safe.ShareAAD(ref)
	gp := pkcs11.NewGCMParams(iv, aad, tagBits)
	defer gp.Free()
	if err := s.mod.ctx.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, gp)}, s.key); err != nil {
		return nil, fmt.Errorf("C_EncryptInit (AES-GCM): %w", err)
	}
	ct, err := s.mod.ctx.Encrypt(sh, pt)
	if err != nil {
		return nil, fmt.Errorf("C_Encrypt (AES-GCM): %w", err)
	}
	// Some tokens ignore the caller's IV and write their own into the
	// parameters; store the one actually used.
	used := gp.IV()
	if len(used) != safe.NonceSize {
		return nil, fmt.Errorf("the token used a %d-byte GCM IV, want %d", len(used), safe.NonceSize)
	}
	if len(ct) != len(pt)+tagBits/8 {
		return nil, fmt.Errorf("the token returned %d bytes of AES-GCM output for %d bytes of input, want %d", len(ct), len(pt), len(pt)+tagBits/8)
	}
	check, err := s.decrypt(sh, ref, used, ct)
	switch {
	case err != nil && unusable(err):
		return nil, fmt.Errorf("checking the new ciphertext: %w", err)
	case err != nil:
		// Not ErrTampered: nothing stored was tampered with; the token
		// failed to round-trip a fresh ciphertext.
		return nil, fmt.Errorf("the new ciphertext does not decrypt on the token: %v", err)
	}
	same := subtle.ConstantTimeCompare(check, pt) == 1
	clear(check)
	if !same {
		return nil, errors.New("the new ciphertext decrypts to something else")
	}
	return safe.EncodeSealed(ref, s.keyLabel, used, ct)
}

// decrypt opens an AES-GCM ciphertext for ref on the token. A failure that
// depends on the data (wrong tag, wrong length, any code a token reports for
// them) is safe.ErrTampered, without detail; a failure that says the session
// or token is unusable is returned as it is.
func (s *Safe) decrypt(sh pkcs11.SessionHandle, ref safe.ShareRef, iv, ct []byte) ([]byte, error) {
	gp := pkcs11.NewGCMParams(iv, safe.ShareAAD(ref), tagBits)
	defer gp.Free()
	if err := s.mod.ctx.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, gp)}, s.key); err != nil {
		return nil, fmt.Errorf("C_DecryptInit (AES-GCM): %w", err)
	}
	pt, err := s.mod.ctx.Decrypt(sh, ct)
	if err != nil {
		if unusable(err) {
			return nil, fmt.Errorf("C_Decrypt (AES-GCM): %w", err)
		}
		// SoftHSM2 reports a wrong tag as CKR_GENERAL_ERROR, others as
		// CKR_ENCRYPTED_DATA_INVALID or CKR_ENCRYPTED_DATA_LEN_RANGE.
		return nil, safe.ErrTampered
	}
	return pt, nil
}

// unusable reports errors that say nothing about the data but that the
// session, login or token cannot be used: never reported as tampering.
func unusable(err error) bool {
	for _, rv := range []uint{
		pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_OPERATION_ACTIVE,
		pkcs11.CKR_OPERATION_NOT_INITIALIZED, pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED,
		pkcs11.CKR_HOST_MEMORY, pkcs11.CKR_DEVICE_MEMORY, pkcs11.CKR_FUNCTION_CANCELED,
	} {
		if isRV(err, rv) {
			return true
		}
	}
	return false
}

// Unseal returns the share stored under ref.
func (s *Safe) Unseal(ctx context.Context, ref safe.ShareRef) (secret.Bytes, error) {
	if err := ref.Validate(); err != nil {
		return secret.Bytes{}, fmt.Errorf("pkcs11safe: unseal: %w", err)
	}
	var share secret.Bytes
	err := s.do(ctx, func(sh pkcs11.SessionHandle) error {
		s.storeMu.RLock()
		defer s.storeMu.RUnlock()
		objs, err := findObjects(s.mod.ctx, sh, recordTemplate(ref))
		switch {
		case err != nil:
			return err
		case len(objs) == 0:
			return cmp.Or(s.checkLoggedIn(sh), safe.ErrNotFound)
		case len(objs) > 1:
			return fmt.Errorf("%w: %d records under one reference", safe.ErrTampered, len(objs))
		}
		record, err := s.readRecord(sh, objs[0])
		if err != nil {
			return err
		}
		rec, err := safe.DecodeSealed(record, ref)
		if err != nil {
			return err
		}
		if rec.GetKeyLabel() != s.keyLabel {
			return fmt.Errorf("%w: sealed under key %q, this safe uses %q", safe.ErrTampered, rec.GetKeyLabel(), s.keyLabel)
		}
		pt, err := s.decrypt(sh, ref, rec.GetNonce(), rec.GetCiphertext())
		if err != nil {
			return err
		}
		share = secret.New(pt)
		clear(pt)
		return nil
	})
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("pkcs11safe: unseal %s on token %q: %w", ref, s.label, err)
	}
	return share, nil
}

// List returns the reference of every record on the token, sorted.
func (s *Safe) List(ctx context.Context) ([]safe.ShareRef, error) {
	var refs []safe.ShareRef
	err := s.do(ctx, func(sh pkcs11.SessionHandle) error {
		s.storeMu.RLock()
		defer s.storeMu.RUnlock()
		objs, err := findObjects(s.mod.ctx, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, application),
		})
		if err != nil {
			return err
		}
		if err := s.checkLoggedIn(sh); err != nil {
			return err
		}
		for _, obj := range objs {
			attrs, err := s.mod.ctx.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return fmt.Errorf("C_GetAttributeValue(CKA_LABEL): %w", err)
			}
			if ref, ok := parseLabel(string(attrs[0].Value)); ok {
				refs = append(refs, ref)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: list token %q: %w", s.label, err)
	}
	slices.SortFunc(refs, func(a, b safe.ShareRef) int {
		return cmp.Or(strings.Compare(a.GenesisID, b.GenesisID), cmp.Compare(a.Epoch, b.Epoch), cmp.Compare(a.Index, b.Index))
	})
	return slices.Compact(refs), nil
}

// Destroy deletes the record stored under ref (every copy, should there be
// several).
func (s *Safe) Destroy(ctx context.Context, ref safe.ShareRef) error {
	if err := ref.Validate(); err != nil {
		return fmt.Errorf("pkcs11safe: destroy: %w", err)
	}
	err := s.do(ctx, func(sh pkcs11.SessionHandle) error {
		s.storeMu.Lock()
		defer s.storeMu.Unlock()
		objs, err := findObjects(s.mod.ctx, sh, recordTemplate(ref))
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return cmp.Or(s.checkLoggedIn(sh), safe.ErrNotFound)
		}
		for _, obj := range objs {
			if err := s.mod.ctx.DestroyObject(sh, obj); err != nil {
				return fmt.Errorf("C_DestroyObject: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pkcs11safe: destroy %s on token %q: %w", ref, s.label, err)
	}
	return nil
}

// Close refuses new operations (they return safe.ErrClosed), waits for the
// running ones, logs out, closes the sessions and releases the library
// (finalizing it if this was its last Safe). Closing twice is a no-op.
func (s *Safe) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.closing)
	s.mu.Unlock()
	s.inflight.Wait()

	err := errors.Join(s.closeAnchor(), s.pool.shutdown())
	s.mod.releaseToken(s.tokenKey)
	if rerr := s.mod.release(); rerr != nil {
		err = errors.Join(err, rerr)
	}
	if err != nil {
		return fmt.Errorf("pkcs11safe: close token %q: %w", s.label, err)
	}
	return nil
}
