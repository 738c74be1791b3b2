package pkcs11safe

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// keyTemplate is the template of the sealing key: a token AES-256 key that
// is private, sensitive and non-extractable (so its value can neither be
// read nor wrapped out), usable only to encrypt and decrypt, and whose
// attributes cannot be changed.
func keyTemplate(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
}

// sealingKey finds the key labelled s.keyLabel, or generates it on the
// token, and checks that it is fit to seal shares.
func (s *Safe) sealingKey(sh pkcs11.SessionHandle) (pkcs11.ObjectHandle, error) {
	byLabel := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, s.keyLabel),
	}
	keys, err := findObjects(s.mod.ctx, sh, byLabel)
	if err != nil {
		return 0, fmt.Errorf("pkcs11safe: token %q: finding key %q: %w", s.label, s.keyLabel, err)
	}
	switch len(keys) {
	case 0:
		// Generate a key only for a token that holds no shares: shares
		// without their key mean a wrong KeyLabel (or a lost key), and a
		// new key would open none of them.
		if err := s.checkLoggedIn(sh); err != nil {
			return 0, fmt.Errorf("pkcs11safe: token %q: %w", s.label, err)
		}
		records, err := findObjects(s.mod.ctx, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, application),
		})
		if err != nil {
			return 0, fmt.Errorf("pkcs11safe: token %q: finding records: %w", s.label, err)
		}
		if len(records) > 0 {
			return 0, fmt.Errorf("pkcs11safe: token %q holds %d sealed shares but no key labelled %q; refusing to generate a new key that opens none of them (check KeyLabel)", s.label, len(records), s.keyLabel)
		}
		key, err := s.mod.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, keyTemplate(s.keyLabel))
		if err != nil {
			return 0, fmt.Errorf("pkcs11safe: token %q: generating key %q: %w", s.label, s.keyLabel, err)
		}
		// Another process may have generated one at the same moment. Two
		// keys under one label would make shares ambiguous: back off.
		keys, err = findObjects(s.mod.ctx, sh, byLabel)
		switch {
		case err != nil:
			_ = s.mod.ctx.DestroyObject(sh, key)
			return 0, fmt.Errorf("pkcs11safe: token %q: finding key %q after generating it: %w", s.label, s.keyLabel, err)
		case len(keys) != 1:
			_ = s.mod.ctx.DestroyObject(sh, key)
			return 0, fmt.Errorf("pkcs11safe: token %q: %d keys labelled %q after generating one: someone else generated one at the same time; open again", s.label, len(keys), s.keyLabel)
		}
		// Check what the token made, not what was asked for.
		return key, s.checkKey(sh, key)
	case 1:
		return keys[0], s.checkKey(sh, keys[0])
	default:
		return 0, fmt.Errorf("pkcs11safe: token %q has %d secret keys labelled %q; refusing to guess which seals the shares", s.label, len(keys), s.keyLabel)
	}
}

// checkKey refuses a sealing key that is not a non-extractable, sensitive
// token AES-256 key that can encrypt and decrypt. A key that was ever
// extractable or not sensitive (CKA_NEVER_EXTRACTABLE or
// CKA_ALWAYS_SENSITIVE false) may have copies outside the token.
func (s *Safe) checkKey(sh pkcs11.SessionHandle, key pkcs11.ObjectHandle) error {
	attrs, err := s.mod.ctx.GetAttributeValue(sh, key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, nil),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
	})
	if err != nil {
		return fmt.Errorf("pkcs11safe: token %q: reading the attributes of key %q: %w", s.label, s.keyLabel, err)
	}
	var problems []string
	want := func(ok bool, problem string) {
		if !ok {
			problems = append(problems, problem)
		}
	}
	keyType, ktOK := attrUint(attrs[0])
	valueLen, vlOK := attrUint(attrs[1])
	want(ktOK && keyType == pkcs11.CKK_AES, "not an AES key")
	want(vlOK && valueLen == 32, "not 32 bytes long")
	want(attrBool(attrs[2]), "not a token object")
	want(attrBool(attrs[3]), "not sensitive")
	want(attrBool(attrs[4]), "not always sensitive")
	want(!attrBool(attrs[5]), "extractable")
	want(attrBool(attrs[6]), "not never-extractable")
	want(attrBool(attrs[7]) && attrBool(attrs[8]), "not allowed to encrypt and decrypt")
	if len(problems) > 0 {
		return fmt.Errorf("pkcs11safe: token %q: refusing key %q: it is %s (a sealing key must be an AES-256 token key that was always sensitive and never extractable; to have one generated on the token, choose another KeyLabel)",
			s.label, s.keyLabel, strings.Join(problems, ", "))
	}
	return nil
}

func attrBool(a *pkcs11.Attribute) bool { return len(a.Value) == 1 && a.Value[0] != 0 }

// attrUint decodes a CK_ULONG attribute (native byte order, as the library
// wrote it).
func attrUint(a *pkcs11.Attribute) (uint, bool) {
	switch len(a.Value) {
	case 4:
		return uint(binary.NativeEndian.Uint32(a.Value)), true
	case 8:
		return uint(binary.NativeEndian.Uint64(a.Value)), true
	}
	return 0, false
}
