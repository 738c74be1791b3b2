package pkcs11safe

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/cairnkms/cairn/safe"
)

// recordLabel is the CKA_LABEL of the record for ref.
func recordLabel(ref safe.ShareRef) string {
	return fmt.Sprintf("%s%s:%d:%d", labelPrefix, ref.GenesisID, ref.Epoch, ref.Index)
}

// parseLabel parses a record label. Only the canonical form is accepted, so
// that one reference has one label.
func parseLabel(label string) (safe.ShareRef, bool) {
	rest, ok := strings.CutPrefix(label, labelPrefix)
	if !ok {
		return safe.ShareRef{}, false
	}
	parts := strings.Split(rest, ":")
	if len(parts) != 3 {
		return safe.ShareRef{}, false
	}
	epoch, err1 := strconv.ParseUint(parts[1], 10, 32)
	index, err2 := strconv.ParseUint(parts[2], 10, 32)
	if err1 != nil || err2 != nil {
		return safe.ShareRef{}, false
	}
	ref := safe.ShareRef{GenesisID: parts[0], Epoch: uint32(epoch), Index: uint32(index)}
	if ref.Validate() != nil || recordLabel(ref) != label {
		return safe.ShareRef{}, false
	}
	return ref, true
}

// recordTemplate finds the record for ref.
func recordTemplate(ref safe.ShareRef) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, application),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, recordLabel(ref)),
	}
}

// createRecord stores record as the data object for ref (see the package
// comment for its attributes).
func (s *Safe) createRecord(sh pkcs11.SessionHandle, ref safe.ShareRef, record []byte) (pkcs11.ObjectHandle, error) {
	obj, err := s.mod.ctx.CreateObject(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, application),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, recordLabel(ref)),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, record),
	})
	if err != nil {
		return 0, fmt.Errorf("C_CreateObject: %w", err)
	}
	return obj, nil
}

// readRecord returns the CKA_VALUE of a record.
func (s *Safe) readRecord(sh pkcs11.SessionHandle, obj pkcs11.ObjectHandle) ([]byte, error) {
	attrs, err := s.mod.ctx.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		return nil, fmt.Errorf("C_GetAttributeValue(CKA_VALUE): %w", err)
	}
	return attrs[0].Value, nil
}

// findObjects returns every object matching tmpl.
func findObjects(p *pkcs11.Ctx, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	var (
		objs []pkcs11.ObjectHandle
		ferr error
	)
	for {
		batch, _, err := p.FindObjects(sh, 64)
		if err != nil {
			ferr = fmt.Errorf("C_FindObjects: %w", err)
			break
		}
		if len(batch) == 0 {
			break
		}
		objs = append(objs, batch...)
	}
	// Always end the search: an open one blocks the session's next.
	if err := p.FindObjectsFinal(sh); err != nil && ferr == nil {
		ferr = fmt.Errorf("C_FindObjectsFinal: %w", err)
	}
	return objs, ferr
}
