// PNG text chunks written in the browser, so a downloaded result carries its parameters (as
// A1111's "parameters" chunk does). A chunk is length, type, data, and the CRC-32 of type+data;
// the new chunks go right before IEND, the last chunk.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

const isLatin1 = (text) => /^[\x00-\xff]*$/.test(text);

// tEXt holds Latin-1 only; text outside it goes into an iTXt chunk (UTF-8, uncompressed).
function textChunk(keyword, text) {
  if (isLatin1(text)) {
    const data = Uint8Array.from(`${keyword}\0${text}`, (ch) => ch.charCodeAt(0));
    return chunk("tEXt", data);
  }
  const head = Uint8Array.from(`${keyword}\0\0\0\0\0`, (ch) => ch.charCodeAt(0));  // flag, method, language, translated
  const body = new TextEncoder().encode(text);
  const data = new Uint8Array(head.length + body.length);
  data.set(head);
  data.set(body, head.length);
  return chunk("iTXt", data);
}

// The offset of the IEND chunk: walks the chunks from the 8-byte signature.
function iendOffset(png) {
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  let offset = 8;
  while (offset + 12 <= png.length) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...png.subarray(offset + 4, offset + 8));
    if (type === "IEND") return offset;
    offset += 12 + length;
  }
  throw new Error("not a PNG: no IEND chunk");
}

// png: Uint8Array of a PNG; texts: {keyword: text}. Returns a new Uint8Array.
export function withText(png, texts) {
  const at = iendOffset(png);
  const chunks = Object.entries(texts).map(([keyword, text]) => textChunk(keyword, text));
  const size = png.length + chunks.reduce((sum, c) => sum + c.length, 0);
  const out = new Uint8Array(size);
  out.set(png.subarray(0, at));
  let offset = at;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  out.set(png.subarray(at), offset);
  return out;
}

export function fromBase64(b64) {
  return Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
}
