package kms

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/kms/keystore"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// UsageFile is the name, in Config.StateDir, of the persisted usage history:
// per keyset version, counts and the last use, which the Safety check needs
// after a restart. It holds no key material.
const UsageFile = "usage.tsv"

// maxUsageFile bounds what readUsageFile reads and writeUsageFile writes
// (a few versions of 100k keysets take about 15 MB).
const maxUsageFile = 256 << 20

// The file is text: a header line, then one line per record of
// tab-separated fields (keyset names hold no tab or newline). Version 2, which
// this server writes, has two kinds of lines, told by their first field:
//
//	cairn-kms-usage 2
//	u <keyset> <key id> <1 if decrypting, else 0> <TTL ns> <encrypts> <decrypts> <last use, unix ns> <last encrypt, unix ns> <window ns> <1 if history lost, else 0>
//	t <keyset> <TTL ns> <from, unix ns> <until, unix ns; 0: in force>
//
// "u" is a version's usage (TTL: the keyset's effective TTL when written);
// "t" a period of this server's own TTL history of a keyset, oldest first.
// Version 1 (still read) has only usage lines, without a kind and without
// the last three fields:
//
//	cairn-kms-usage 1
//	<keyset> <key id> <1 if decrypting, else 0> <TTL ns> <encrypts> <decrypts> <last use, unix ns>
//
// Hand-written rather than JSON: a server of 100k keysets reads it at every
// boot and writes it every few seconds.
const (
	usageHeader   = "cairn-kms-usage 2\n"
	usageHeaderV1 = "cairn-kms-usage 1\n"
)

// maxTTLPeriods bounds a keyset's TTL history in the file (a TTL change
// adds a period; periods over are dropped, so a few is the norm).
const maxTTLPeriods = 1024

// encodeUsage is the file's content for the records and TTL histories.
func encodeUsage(records []keystore.UsageRecord, ttl map[string][]safety.TTLPeriod) []byte {
	b := make([]byte, 0, len(usageHeader)+len(records)*80+len(ttl)*48)
	b = append(b, usageHeader...)
	bit := func(b []byte, v bool) []byte {
		if v {
			return append(b, '1', '\t')
		}
		return append(b, '0', '\t')
	}
	num := func(b []byte, n int64) []byte { return append(strconv.AppendInt(b, n, 10), '\t') }
	for _, r := range records {
		b = append(b, "u\t"...)
		b = append(b, r.Keyset...)
		b = append(b, '\t')
		b = strconv.AppendUint(b, uint64(r.KeyID), 10)
		b = append(b, '\t')
		b = bit(b, r.Decrypting)
		b = num(b, int64(r.TTL))
		b = append(strconv.AppendUint(b, r.EncryptCount, 10), '\t')
		b = append(strconv.AppendUint(b, r.DecryptCount, 10), '\t')
		b = num(b, unixNano(r.LastUse))
		b = num(b, unixNano(r.LastEncrypt))
		b = num(b, int64(r.Window))
		b = bit(b, r.HistoryLost)
		b[len(b)-1] = '\n'
	}
	for _, name := range slices.Sorted(maps.Keys(ttl)) {
		for _, tp := range ttl[name] {
			b = append(b, "t\t"...)
			b = append(b, name...)
			b = append(b, '\t')
			b = num(b, int64(tp.TTL))
			b = num(b, unixNano(tp.From))
			b = num(b, unixNano(tp.Until))
			b[len(b)-1] = '\n'
		}
	}
	return b
}

// unixNano is t in unix nanoseconds, 0 for the zero time.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// timeOf is the inverse of unixNano.
func timeOf(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// decodeUsage parses the file's content strictly (version 1 or 2).
func decodeUsage(data []byte) (keystore.History, error) {
	var h keystore.History
	v2 := true
	rest, ok := bytes.CutPrefix(data, []byte(usageHeader))
	if !ok {
		if rest, ok = bytes.CutPrefix(data, []byte(usageHeaderV1)); !ok {
			return h, fmt.Errorf("no %q or %q header", strings.TrimSpace(usageHeader), strings.TrimSpace(usageHeaderV1))
		}
		v2 = false
	}
	for n := 2; len(rest) > 0; n++ {
		line, after, found := bytes.Cut(rest, []byte{'\n'})
		if !found {
			return h, fmt.Errorf("line %d: incomplete", n)
		}
		rest = after
		f := strings.Split(string(line), "\t")
		kind := "u"
		if v2 {
			kind, f = f[0], f[1:]
		}
		switch kind {
		case "u":
			r, err := decodeRecord(f, v2)
			if err != nil {
				return h, fmt.Errorf("line %d: %v", n, err)
			}
			h.Usage = append(h.Usage, r)
		case "t":
			if len(f) != 4 {
				return h, fmt.Errorf("line %d: %d fields, want 5", n, len(f)+1)
			}
			ttl, err1 := strconv.ParseInt(f[1], 10, 64)
			from, err2 := strconv.ParseInt(f[2], 10, 64)
			until, err3 := strconv.ParseInt(f[3], 10, 64)
			if err := errors.Join(err1, err2, err3); err != nil {
				return h, fmt.Errorf("line %d: malformed field (%v)", n, err)
			}
			if h.TTL == nil {
				h.TTL = map[string][]safety.TTLPeriod{}
			}
			h.TTL[f[0]] = append(h.TTL[f[0]], safety.TTLPeriod{TTL: time.Duration(ttl), From: timeOf(from), Until: timeOf(until)})
		default:
			return h, fmt.Errorf("line %d: unknown kind %q", n, kind)
		}
	}
	return h, nil
}

// decodeRecord parses the fields of a usage line (after its kind in v2).
func decodeRecord(f []string, v2 bool) (keystore.UsageRecord, error) {
	want := 7
	if v2 {
		want = 10
	}
	if len(f) != want {
		return keystore.UsageRecord{}, fmt.Errorf("%d fields, want %d", len(f), want)
	}
	id, err1 := strconv.ParseUint(f[1], 10, 32)
	ttl, err2 := strconv.ParseInt(f[3], 10, 64)
	enc, err3 := strconv.ParseUint(f[4], 10, 64)
	dec, err4 := strconv.ParseUint(f[5], 10, 64)
	last, err5 := strconv.ParseInt(f[6], 10, 64)
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil || (f[2] != "0" && f[2] != "1") {
		return keystore.UsageRecord{}, fmt.Errorf("malformed field (%v)", err)
	}
	r := keystore.UsageRecord{Keyset: f[0], KeyID: uint32(id), Decrypting: f[2] == "1", TTL: time.Duration(ttl),
		EncryptCount: enc, DecryptCount: dec, LastUse: timeOf(last)}
	if !v2 {
		return r, nil
	}
	lastEnc, err1 := strconv.ParseInt(f[7], 10, 64)
	window, err2 := strconv.ParseInt(f[8], 10, 64)
	if err := errors.Join(err1, err2); err != nil || (f[9] != "0" && f[9] != "1") {
		return keystore.UsageRecord{}, fmt.Errorf("malformed field (%v)", err)
	}
	r.LastEncrypt, r.Window, r.HistoryLost = timeOf(lastEnc), time.Duration(window), f[9] == "1"
	return r, nil
}

// errNoUsageFile is readUsageFile's answer when there is no file.
var errNoUsageFile = errors.New("no usage history file")

// readUsageFile reads and checks the persisted usage history. It refuses a
// symbolic link, anything but a regular file, a file over maxUsageFile, and
// a record no KMS would write (an empty keyset name, a negative TTL or
// window, a last use or encryption more than maxClockSkew after now, a last
// encryption after the last use, a TTL history out of order, overlapping,
// with a non-positive TTL, open before its end, or longer than
// maxTTLPeriods). It returns errNoUsageFile if there is no file.
func readUsageFile(dir string, now time.Time) (keystore.History, error) {
	var none keystore.History
	path := filepath.Join(dir, UsageFile)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return none, errNoUsageFile
	}
	if err != nil {
		return none, err
	}
	defer f.Close() // read-only
	fi, err := f.Stat()
	if err != nil {
		return none, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxUsageFile {
		return none, fmt.Errorf("%s is not a regular file of at most %d bytes", path, maxUsageFile)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxUsageFile+1))
	if err != nil {
		return none, err
	}
	if len(data) > maxUsageFile {
		return none, fmt.Errorf("%s grew past %d bytes while read", path, maxUsageFile)
	}
	h, err := decodeUsage(data)
	if err != nil {
		return none, fmt.Errorf("%s does not decode: %w", path, err)
	}
	if err := checkHistory(h, now); err != nil {
		return none, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// checkHistory refuses what no KMS would write (see readUsageFile).
func checkHistory(h keystore.History, now time.Time) error {
	late := now.Add(maxClockSkew)
	for i, r := range h.Usage {
		switch {
		case keysets.ValidName(r.Keyset) != nil:
			return fmt.Errorf("record %d names no valid keyset", i)
		case r.TTL < 0 || r.Window < 0:
			return fmt.Errorf("record %d has a negative TTL or window", i)
		case r.LastUse.After(late):
			return fmt.Errorf("record %d was last used at %s, after now (%s)", i, r.LastUse.Format(time.RFC3339), now.Format(time.RFC3339))
		case r.LastEncrypt.After(r.LastUse):
			return fmt.Errorf("record %d was last encrypted with after its last use", i)
		}
	}
	for name, periods := range h.TTL {
		if keysets.ValidName(name) != nil {
			return fmt.Errorf("a TTL history names no valid keyset")
		}
		if len(periods) > maxTTLPeriods {
			return fmt.Errorf("the TTL history of %q has %d periods, more than %d", name, len(periods), maxTTLPeriods)
		}
		for i, tp := range periods {
			last := i == len(periods)-1
			switch {
			case tp.TTL <= 0:
				return fmt.Errorf("the TTL history of %q: period %d has a TTL that is not positive", name, i)
			case tp.From.IsZero() || tp.From.After(late):
				return fmt.Errorf("the TTL history of %q: period %d starts at no time or after now", name, i)
			case !last && tp.Until.IsZero():
				return fmt.Errorf("the TTL history of %q: period %d is open but not the last", name, i)
			case !tp.Until.IsZero() && tp.Until.Before(tp.From):
				return fmt.Errorf("the TTL history of %q: period %d ends before it starts", name, i)
			case i > 0 && tp.From.Before(periods[i-1].Until):
				return fmt.Errorf("the TTL history of %q: period %d overlaps the one before", name, i)
			}
		}
	}
	return nil
}

// maxClockSkew is how far in the future a persisted last use may be (the
// clock may have been stepped back since it was written).
const maxClockSkew = time.Hour

// setAsideUsageFile renames an unusable usage file out of the way, so that
// the next flush does not destroy it (an operator may want to look).
func setAsideUsageFile(dir string, now time.Time) (string, error) {
	aside := filepath.Join(dir, fmt.Sprintf("%s.unusable-%d", UsageFile, now.Unix()))
	return aside, os.Rename(filepath.Join(dir, UsageFile), aside)
}

// usageFromBundle is the history to assume when a server that served a
// bundle has lost its own: every version the bundle lists as decrypting,
// used now. It keeps the Safety check closed (no such version may leave the
// decrypt set before its TTL has passed) rather than open.
//
// The records are marked HistoryLost, and take the longest TTL the bundle
// tells of (its ciphertext TTL and the live periods of its ttl_history): the
// server's own TTL history is lost with the file.
func usageFromBundle(b *bundlev1.Bundle, now time.Time) []keystore.UsageRecord {
	var out []keystore.UsageRecord
	for _, k := range b.GetKeysets() {
		ttl := k.GetCiphertextTtl().AsDuration()
		var hist []safety.TTLPeriod
		for _, p := range k.GetTtlHistory() {
			tp := safety.TTLPeriod{TTL: p.GetTtl().AsDuration(), From: p.GetFrom().AsTime()}
			if p.GetUntil() != nil {
				tp.Until = p.GetUntil().AsTime()
			}
			hist = append(hist, tp)
		}
		ttl = max(ttl, safety.EffectiveTTL(hist, now))
		for _, v := range k.GetKeyset().GetVersions() {
			switch v.GetStatus() {
			case cryptov1.KeyStatus_KEY_STATUS_PRIMARY, cryptov1.KeyStatus_KEY_STATUS_ENABLED:
				out = append(out, keystore.UsageRecord{Keyset: k.GetName(), KeyID: v.GetKeyId(), Decrypting: true,
					TTL: ttl, Window: k.GetPropagationWindow().AsDuration(), LastUse: now, LastEncrypt: now, HistoryLost: true})
			}
		}
	}
	return out
}

// writeUsageFile replaces the persisted usage history atomically. It
// refuses to write a file readUsageFile would refuse for its size.
func writeUsageFile(dir string, records []keystore.UsageRecord, ttl map[string][]safety.TTLPeriod) error {
	data := encodeUsage(records, ttl)
	if len(data) > maxUsageFile {
		return fmt.Errorf("the usage history is %d bytes, more than %d", len(data), maxUsageFile)
	}
	return atomicfile.Write(filepath.Join(dir, UsageFile), data, 0o600)
}
