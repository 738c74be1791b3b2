package pkcs11safe

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// A module is one loaded and initialized PKCS#11 library, shared by every
// Safe of the process that uses it. PKCS#11 allows one C_Initialize per
// library per process, keeps the login state per token (not per session),
// and C_Finalize ends every session of every user, so the library is loaded
// once, counted, and finalized only when its last Safe closes.
type module struct {
	path string // canonical (symlinks resolved); the registry key
	ctx  *pkcs11.Ctx
	// initialized reports that this process's C_Initialize succeeded (not
	// CKR_CRYPTOKI_ALREADY_INITIALIZED): only then does release finalize.
	initialized bool

	// Guarded by modules.mu.
	refs   int
	tokens map[string]bool // tokens (serial/label) a Safe has open
}

var modules = struct {
	mu sync.Mutex
	m  map[string]*module
}{m: map[string]*module{}}

// acquireModule loads and initializes the library at path (absolute), or
// returns the already loaded one with its count raised. Pair with release.
func acquireModule(path string) (*module, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("pkcs11safe: module path %q is not absolute (libraries are never loaded from the search path)", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: PKCS#11 module %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("pkcs11safe: PKCS#11 module %s is not a regular file", path)
	}
	// Key the registry by the resolved path: /usr/lib/softhsm/libsofthsm2.so
	// is a symlink, and two Ctx for one library would initialize it twice
	// and finalize it under each other's feet.
	canon, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: PKCS#11 module %s: %w", path, err)
	}

	modules.mu.Lock()
	defer modules.mu.Unlock()
	if m, ok := modules.m[canon]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(canon)
	if ctx == nil {
		why := loadError(canon)
		if why == "" {
			why = "dlopen failed or it has no C_GetFunctionList"
		}
		return nil, fmt.Errorf("pkcs11safe: cannot load PKCS#11 module %s: %s", path, why)
	}
	m := &module{path: canon, ctx: ctx, refs: 1, tokens: map[string]bool{}}
	switch err := ctx.Initialize(); {
	case err == nil:
		m.initialized = true
	case isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
		// Someone else in the process (not a Safe) initialized it; they
		// own the finalization.
	default:
		ctx.Destroy()
		return nil, fmt.Errorf("pkcs11safe: C_Initialize of PKCS#11 module %s%s: %w", path, configHint(canon), err)
	}
	modules.m[canon] = m
	return m, nil
}

// claimToken records that a Safe has the token open. A second Safe on the
// same token in one process is refused: the login is shared by the whole
// process (a second C_Login returns CKR_USER_ALREADY_LOGGED_IN without
// checking the PIN) and one C_Logout would log the other Safe out.
func (m *module) claimToken(key, label string) error {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	if m.tokens[key] {
		return fmt.Errorf("pkcs11safe: token %q is already open in this process; share its *Safe", label)
	}
	m.tokens[key] = true
	return nil
}

// releaseToken undoes claimToken.
func (m *module) releaseToken(key string) {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	delete(m.tokens, key)
}

// release drops one reference; the last one finalizes and unloads the
// library. Every session of the caller must be closed before.
func (m *module) release() error {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	m.refs--
	if m.refs > 0 {
		return nil
	}
	delete(modules.m, m.path)
	var err error
	if m.initialized {
		if ferr := m.ctx.Finalize(); ferr != nil && !isRV(ferr, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
			err = fmt.Errorf("pkcs11safe: C_Finalize of PKCS#11 module %s: %w", m.path, ferr)
		}
	}
	m.ctx.Destroy()
	return err
}

// softHSM2ConfEnv is the variable SoftHSM2 reads its config file from.
const softHSM2ConfEnv = "SOFTHSM2_CONF"

// configHint names the config a failed C_Initialize most likely choked on.
// SoftHSM2 answers a missing or unreadable config, or a missing token
// directory, with a bare CKR_GENERAL_ERROR, so without the config's name the
// error says nothing an operator can act on. Other modules have no variable
// to name; the hint is empty for them unless SOFTHSM2_CONF is set.
func configHint(module string) string {
	if conf := os.Getenv(softHSM2ConfEnv); conf != "" {
		return fmt.Sprintf(" (its config %s=%s: check that the file exists and that its directories.tokendir exists and is readable)", softHSM2ConfEnv, conf)
	}
	if strings.Contains(filepath.Base(module), "softhsm") {
		return fmt.Sprintf(" (%s is not set, so SoftHSM2 reads its default config, /etc/softhsm/softhsm2.conf: check that it exists and that its directories.tokendir exists and is readable)", softHSM2ConfEnv)
	}
	return ""
}

// isRV reports whether err is the PKCS#11 return value rv.
func isRV(err error, rv uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == rv
}
