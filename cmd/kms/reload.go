package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
)

// trustSource reads what the server trusts from its flags: the pinned
// bundle-signing keys (--signing-key files) and the admin allowlist
// (--admins-file, one pattern a line, or --admins). It is read at start and
// again on SIGHUP and every --reload-interval.
type trustSource struct {
	signingKeys string // comma-separated files
	admins      string // comma-separated patterns, if no adminsFile
	adminsFile  string
	td          spiffeid.TrustDomain
}

// load reads and parses everything; any error leaves nothing half-read.
func (ts trustSource) load() (kms.Trust, error) {
	var t kms.Trust
	for _, path := range identity.SplitList(ts.signingKeys) {
		k, err := bundle.ReadPublicKey(path)
		if err != nil {
			return kms.Trust{}, fmt.Errorf("--signing-key: %w", err)
		}
		t.SigningKeys = append(t.SigningKeys, k)
	}
	if len(t.SigningKeys) == 0 {
		return kms.Trust{}, errors.New("--signing-key: no key files")
	}
	patterns, flag := identity.SplitList(ts.admins), "--admins"
	if ts.adminsFile != "" {
		var err error
		if patterns, err = readPatterns(ts.adminsFile); err != nil {
			return kms.Trust{}, fmt.Errorf("--admins-file: %w", err)
		}
		flag = "--admins-file " + ts.adminsFile
	}
	if len(patterns) == 0 {
		return kms.Trust{}, fmt.Errorf("%s: no patterns (nobody could call KMSAdmin)", flag)
	}
	a, err := identity.ParseAllowlist(ts.td, patterns...)
	if err != nil {
		return kms.Trust{}, fmt.Errorf("%s: %w", flag, err)
	}
	t.Admins = a
	return t, nil
}

// readPatterns reads an admins file: one SPIFFE ID pattern a line; blank
// lines and lines starting with # are ignored.
func readPatterns(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.ContainsAny(line, " \t,") {
			return nil, fmt.Errorf("%s:%d: %q: one pattern a line", path, n, line)
		}
		out = append(out, line)
	}
	return out, sc.Err()
}

// reloadTrust re-reads the trust on SIGHUP and every interval (0: on
// SIGHUP only) until ctx is done, and gives a changed one to srv.SetTrust
// (which swaps it atomically, audits and logs the new key IDs). A trust
// that does not read or parse is logged and changes nothing: the server
// keeps the set it has.
func reloadTrust(ctx context.Context, log *slog.Logger, srv *kms.Server, ts trustSource, interval time.Duration, hup <-chan os.Signal) {
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	lastErr := ""
	for {
		why := "poll"
		select {
		case <-ctx.Done():
			return
		case <-hup:
			why = "SIGHUP"
			lastErr = "" // an operator asked: always answer in the log
		case <-tick:
		}
		t, err := ts.load()
		if err == nil {
			if t.Equal(srv.CurrentTrust()) {
				if why == "SIGHUP" {
					log.Info("kms: trust reloaded on SIGHUP: unchanged", "signing_key_ids", t.KeyIDs(), "admins", t.AdminPatterns())
				}
				lastErr = ""
				continue
			}
			err = srv.SetTrust(t)
		}
		if err != nil {
			if msg := err.Error(); msg != lastErr { // a poll repeats a broken file's error once, not every interval
				cur := srv.CurrentTrust()
				log.Error("kms: reloading the signing keys and admins failed; keeping the current set", "trigger", why, "err", err,
					"signing_key_ids", cur.KeyIDs(), "admins", cur.AdminPatterns())
				lastErr = msg
			}
			continue
		}
		lastErr = ""
	}
}

// notifyHUP delivers SIGHUP to the returned channel until stop is called.
func notifyHUP() (<-chan os.Signal, func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	return ch, func() { signal.Stop(ch) }
}
